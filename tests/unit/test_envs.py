"""The environment switches with values to parse (tandem/envs.py): each value the docstring
names maps as documented, the default included, and anything else raises ValueError
naming the variable (a typo never silently selects a default)."""

from __future__ import annotations

import pytest

from tandem import envs


def _check(monkeypatch, name, read, cases, bad):
    for value, expected in cases:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert read() == expected, (name, value)
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            read()


def test_moe_one_launch(monkeypatch):
    _check(monkeypatch, "TANDEM_MOE_ONE_LAUNCH", envs.moe_one_launch,
           [(None, "auto"), ("auto", "auto"), ("AUTO", "auto"), ("1", "always"),
            ("0", "never")], ["yes", "2", "on"])


def test_moe_one_config(monkeypatch):
    _check(monkeypatch, "TANDEM_MOE_ONE_CONFIG", envs.moe_one_config,
           [(None, None), ("", None), ("32,256,64,128,4,3", (32, 256, 64, 128, 4, 3))],
           ["32,256,64,128,4", "32,256,64,128,4,3,1", "24,256,64,128,4,3", "a,b,c,d,e,f",
            "32,256,64,128,4,0"])


def test_decode_min_part(monkeypatch):
    _check(monkeypatch, "TANDEM_DECODE_MIN_PART", envs.decode_min_part,
           [(None, None), ("", None), ("64", 64), ("128", 128), ("16", 16)],
           ["8", "96", "-64", "64.0", "x"])


def test_decode_tiles(monkeypatch):
    _check(monkeypatch, "TANDEM_DECODE_TILES", envs.decode_tiles,
           [(None, None), ("", None), ("64,4,3", (64, 4, 3)), ("128,8,2", (128, 8, 2))],
           ["64,4", "64,4,3,1", "48,4,3", "64,3,3", "64,4,0", "64,4,9", "a,b,c"])


def test_fp8_cast_half(monkeypatch):
    _check(monkeypatch, "TANDEM_FP8_CAST_HALF", envs.fp8_cast_half,
           [(None, True), ("1", True), ("0", False)], ["2", "yes", ""])


def test_fp8_amax_k(monkeypatch):
    _check(monkeypatch, "TANDEM_FP8_AMAX_K", envs.fp8_amax_k,
           [(None, None), ("auto", None), ("0", 0), ("16", 16), ("4096", 4096)],
           ["8", "1000", "-16", "x", ""])


def test_fp8_decode(monkeypatch):
    _check(monkeypatch, "TANDEM_FP8_DECODE", envs.fp8_decode,
           [(None, "auto"), ("auto", "auto"), ("dot", "dot"), ("cast", "cast")],
           ["fast", "", "Dot"])
