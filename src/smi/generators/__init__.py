"""Generator-based synthesis: a conditional generator trained against the teacher emits images in one pass.

``ConditionalGenerator`` is GDFQ's; :func:`train_generator` trains it against a frozen teacher
(cross-entropy + BatchNorm statistics, or PSAQ-ViT's patch-similarity entropy for ViTs), and
``generator:PATH`` (:class:`GeneratorSource`) is a data source like a pool folder.
"""

from smi.generators.model import ConditionalGenerator
from smi.generators.train import GeneratorConfig, GeneratorSource, generator_loss, load_generator, train_generator

__all__ = ["ConditionalGenerator", "GeneratorConfig", "GeneratorSource", "generator_loss", "load_generator",
           "train_generator"]
