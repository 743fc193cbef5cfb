"""CompactConfig validation, presets and fingerprints."""

import warnings

import pytest

from compactfusion import PRESETS, CompactConfig
from compactfusion.codecs import available_codecs, get_codec


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = CompactConfig.preset(name)
    assert cfg.make_codec().name == cfg.codec


def test_every_preset_is_a_codec_and_every_codec_a_preset():
    assert sorted(PRESETS) == available_codecs()
    for name in available_codecs():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # current names never warn
            cfg = CompactConfig.preset(name)
        # The preset named after a codec is that codec with its defaults: one meaning per name.
        assert cfg.codec == name and cfg == CompactConfig(codec=name)
        assert cfg.make_codec().as_dict() == get_codec(name).as_dict()


@pytest.mark.parametrize("old, new", [("sparse", "nm_sparse"), ("off", "raw")])
def test_deprecated_preset_names_warn_and_map(old, new):
    with pytest.warns(DeprecationWarning, match=f"preset '{old}' is deprecated, use '{new}'") as w:
        cfg = CompactConfig.preset(old, mode="ring", warmup_steps=2)
    assert cfg == CompactConfig.preset(new, mode="ring", warmup_steps=2)
    assert [r.filename for r in w] == [__file__]  # points at the caller, not at config.py
    assert old not in PRESETS


def test_to_dict_is_a_deprecated_alias_of_as_dict():
    cfg = CompactConfig(codec="nm_sparse", codec_params={"n": 2, "m": 8}, mode="ring")
    with pytest.warns(DeprecationWarning, match=r"to_dict\(\) is deprecated, use .*as_dict"):
        old = cfg.to_dict()
    assert old == cfg.as_dict()
    assert cfg.as_dict()["codec_params"] == {"m": 8, "n": 2} and cfg.as_dict()["mode"] == "ring"


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        CompactConfig.preset("int3")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"codec": "int3"}, "codec"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"min_numel": -5}, "min_numel"),
        ({"residual": "yes"}, "residual"),
        ({"mode": "tree"}, "mode"),
        ({"policy": "sometimes"}, "policy"),
        ({"policy": "auto"}, "link"),
        ({"policy": "auto", "link": "carrier-pigeon"}, "link"),
        ({"policy": "auto", "link": -3.0}, "link"),
        ({"backend": "cuda"}, "backend"),
        ({"site_policy": 3}, "site_policy"),
        ({"codec": "lowrank", "codec_params": {"rank": 0}}, "codec_params"),
        ({"codec": "nm_sparse", "codec_params": {"n": 4, "m": 4}}, "codec_params"),
        ({"codec": "int2", "codec_params": {"group_size": 7}}, "codec_params"),
        ({"codec": "int2", "codec_params": {"bogus": 1}}, "codec_params"),
        ({"codec_params": [1, 2]}, "codec_params"),
        ({"residual": False, "error_feedback": False}, "error_feedback"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompactConfig(**kwargs)


def test_declared_but_unbuilt_combination():
    CompactConfig(codec="int2", mode="stale")  # compressed DistriFusion
    CompactConfig(codec="raw", mode="stale")


def test_frozen_and_fingerprint():
    a = CompactConfig.preset("int2")
    b = CompactConfig(codec="int2")
    assert a == b and a.fingerprint() == b.fingerprint() and hash(a) == hash(b)
    c = a.replace(warmup_steps=3)
    assert c.fingerprint() != a.fingerprint()
    with pytest.raises(AttributeError):
        a.codec = "int1"  # type: ignore[misc]
    # The caller's dict is copied, so mutating it later changes nothing.
    params = {"group_size": 128}
    d = CompactConfig(codec="int2", codec_params=params)
    params["group_size"] = 64
    assert d.codec_params["group_size"] == 128


def test_link_hints():
    assert CompactConfig(policy="auto", link="pcie").link_bandwidth_gbps() == 25.0
    assert CompactConfig(policy="auto", link=3).link_bandwidth_gbps() == 3.0


def test_lowrank_preset_is_the_codec_default_96x_at_flux_shard_size():
    import torch

    codec = CompactConfig.preset("lowrank").make_codec()
    assert codec.as_dict() == {
        "name": "lowrank",
        "rank": 16,
        "iters": 2,
        "factor_dtype": "int8",
        "seed": 0,
    }
    ratio = 1024 * 3072 * 2 / codec.payload_nbytes((1024, 3072), torch.bfloat16)
    assert 95 < ratio < 96  # 95.9x (bf16 factors: 48.0x)


def test_codec_params_are_read_only_and_picklable():
    import pickle

    cfg = CompactConfig(codec="nm_sparse", codec_params={"n": 2, "m": 8})
    with pytest.raises(TypeError):
        cfg.codec_params["n"] = 1  # type: ignore[index]
    assert cfg.codec_params == {"n": 2, "m": 8}
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert cfg.replace(codec_params={"n": 1, "m": 4}).codec_params == {"n": 1, "m": 4}


def _policy_factory(threshold):
    return lambda key, step: step > threshold


def test_site_policy_fingerprint_sees_code_and_captured_values():
    def late(key, step):
        return step > 2

    def early(key, step):
        return step > 1

    early.__qualname__ = late.__qualname__  # same name, different code
    a, b = CompactConfig(site_policy=late), CompactConfig(site_policy=early)
    assert a.fingerprint() != b.fingerprint()
    c, d = (
        CompactConfig(site_policy=_policy_factory(1)),
        CompactConfig(site_policy=_policy_factory(2)),
    )
    assert c.fingerprint() != d.fingerprint()
    # Equal policies built separately (as on two ranks) agree.
    assert (
        CompactConfig(site_policy=_policy_factory(1)).fingerprint()
        == CompactConfig(site_policy=_policy_factory(1)).fingerprint()
    )


@pytest.mark.parametrize("old, new", [("sparse", "nm_sparse"), ("off", "raw")])
def test_patch_accepts_deprecated_preset_names_with_a_warning(old, new):
    import compactfusion as cf

    # The name is resolved (and the warning raised at the caller) before the pipeline is
    # looked at, so an object nothing can patch shows it without building a pipeline.
    with pytest.warns(DeprecationWarning, match=f"use '{new}'") as w:
        with pytest.raises(TypeError, match="cannot patch"):
            cf.patch(object(), old)
    assert [r.filename for r in w] == [__file__]
    with pytest.warns(DeprecationWarning, match=f"use '{new}'") as w:
        with pytest.raises(TypeError, match="cannot patch"):
            with cf.patched(object(), old):
                pass
    assert [r.filename for r in w] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="cannot patch"):
            cf.patch(object(), new)
