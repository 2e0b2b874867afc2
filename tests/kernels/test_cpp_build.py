"""The C++ kernels' cache key covers the local headers a source includes."""

from __future__ import annotations

from kernels.cpp_build import INCLUDE_DIR, source_bytes


def test_included_local_headers_are_part_of_the_key(tmp_path):
    (tmp_path / "inner.h").write_text("int inner = 1;\n")
    (tmp_path / "outer.h").write_text('#pragma once\n#include "inner.h"\n#include <vector>\n')
    src = tmp_path / "k.cpp"
    src.write_text('#include "outer.h"\n#include "outer.h"\n')
    before = source_bytes(src)
    (tmp_path / "inner.h").write_text("int inner = 2;\n")  # two levels down
    assert source_bytes(src) != before and b"int inner = 2" in source_bytes(src)


def test_the_shared_attention_header_is_in_both_kernels_keys():
    header = (INCLUDE_DIR / "paged_attention_cpu.h").read_bytes()
    for source in (INCLUDE_DIR / "decode_cpu.cpp", INCLUDE_DIR.parent / "server/engine/paged_attention_cpu.cpp"):
        assert header in source_bytes(source)
