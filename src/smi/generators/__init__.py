"""Generator-based synthesis: a conditional generator trained against the teacher emits images in one pass.

:data:`GENERATORS` holds the kinds (GDFQ's ``ConditionalGenerator``, ``QimeraGenerator``,
``TexQGenerator``, ``ACQGenerator``, ``CausalGenerator``);
:func:`train_generator` trains one against a frozen teacher (cross-entropy + BatchNorm statistics,
or PSAQ-ViT's patch-similarity entropy for ViTs); ``generator:PATH`` (:class:`GeneratorSource`) is
a data source like a pool folder, and :func:`smi.generators.pool.generate_pool` writes a pool.
"""

from smi.generators.model import (
    GENERATORS,
    ACQGenerator,
    CausalGenerator,
    ConditionalGenerator,
    QimeraGenerator,
    TexQGenerator,
)
from smi.generators.train import (
    GeneratorConfig,
    GeneratorSource,
    OnlineGeneratorSource,
    build_generator,
    generator_loss,
    load_generator,
    train_generator,
)

__all__ = [
    "GENERATORS", "ACQGenerator", "CausalGenerator", "ConditionalGenerator", "GeneratorConfig", "GeneratorSource",
    "OnlineGeneratorSource", "QimeraGenerator", "TexQGenerator", "build_generator", "generator_loss",
    "load_generator", "train_generator",
]
