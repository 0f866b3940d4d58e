"""Only safetensors, numpy arrays without pickle, and JSON cross a trust boundary."""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.models import load_model

SOURCE = Path(__file__).parents[1] / "src" / "fedlora"
UNSAFE = re.compile(r"\bimport pickle\b|\bpickle\.|torch\.load\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True")


def test_no_unsafe_deserialisation_in_the_package():
    offenders = [f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
                 for path in SOURCE.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), start=1)
                 if UNSAFE.search(line)]
    assert offenders == []


def test_remote_code_is_only_trusted_when_asked(monkeypatch, tmp_path):
    seen = []

    def fake_from_pretrained(source, **kwargs):
        seen.append(kwargs)
        raise OSError("stop here")
    monkeypatch.setattr("fedlora.models.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    for trust in (False, True):
        try:
            load_model(str(tmp_path), trust_remote_code=trust)
        except ValueError:
            pass
    assert "trust_remote_code" not in seen[0] and seen[1]["trust_remote_code"] is True
