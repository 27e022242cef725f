import json

import pytest

from smi.errors import SmiError
from smi.inversion.config import InversionConfig, SparsityConfig


def test_defaults_are_the_papers():
    cfg = InversionConfig()
    assert (cfg.iterations, cfg.batch_size, cfg.lr, cfg.betas, cfg.tv_l2) == (4000, 32, 0.25, (0.5, 0.99), 1e-4)
    assert cfg.sparsity.stops == ((50, 0.3), (100, 0.3), (200, 0.3), (300, 0.3))
    assert SparsityConfig.parse("default") == cfg.sparsity
    assert SparsityConfig.parse("dense").dense


def test_json_round_trip():
    cfg = InversionConfig(iterations=300, sparsity=SparsityConfig.parse("10:0.5,20:0.25"), tv_l1=0.1)
    again = InversionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_kept_counts():
    assert SparsityConfig().kept_counts(196) == [196, 137, 95, 66, 46]
    assert SparsityConfig().kept_counts(49) == [49, 34, 23, 16, 11]


@pytest.mark.parametrize("spec,match", [
    ("50:1.0", r"\[0, 1\)"), ("50:-0.1", r"\[0, 1\)"), ("100:0.3,50:0.3", "increasing"),
    ("50:0.3,50:0.3", "increasing"), ("abc", "ITER:RATIO"), ("0:0.3", "positive"),
])
def test_bad_sparsity(spec, match):
    with pytest.raises(SmiError, match=match):
        SparsityConfig.parse(spec)


def test_stop_beyond_iterations():
    with pytest.raises(SmiError, match="iterations must exceed the last stop iteration"):
        InversionConfig(iterations=100)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method"), (dict(iterations=0), "iterations"), (dict(lr=-1), "lr must be positive"),
    (dict(jitter_unit="pixel"), "must be .patch. for sparse inversion"), (dict(jitter=1.5), "jitter"),
    (dict(color_shift=-0.1), "color_shift must be in"), (dict(color_shift=float("nan")), "color_shift must be in"),
    (dict(crop=1.0), "crop must be a fraction"), (dict(crop=0.5), "crop is dense-only"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(SmiError, match=match):
        InversionConfig(**kwargs)


def test_fields_added_later_stay_out_of_the_record_while_off():
    """A pool written before ``blur``/``color_shift`` existed has the same identity as one made with them off."""
    assert not {"blur", "color_shift", "crop"} & set(InversionConfig().to_dict())
    on = InversionConfig(blur=0.3, color_shift=1.0, crop=0.5, sparsity=SparsityConfig(()))
    assert InversionConfig.from_dict(on.to_dict()) == on


def test_setting_one_knob_keeps_the_methods_other_knobs():
    from smi.inversion import InversionConfig

    cfg = InversionConfig.for_method("dfq-sam", options={"seg_confidence": 0.8})
    assert cfg.option("seg_evolve") == 1.0 and cfg.option("seg_confidence") == 0.8
    assert InversionConfig.for_method("dfq-sam", options={"seg_evolve": 0.0}).option("seg_evolve") == 0.0
