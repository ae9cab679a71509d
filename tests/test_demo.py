"""The README's first command: the demo runs and reports the saving it measured (a 2048-token cache instead of the
default 8192: the passkey prompt shrinks with it, the saving stays close to 2x)."""
import re

from duo_compile.cli import main


def test_demo_reports_kv_saving(capsys):
    assert main(["demo", "--backend", "eager", "--max-new-tokens", "4", "--sink", "16", "--recent", "64",
                 "--max-seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    saving = re.search(r"KV cache at max_seq_len=\d+: .* \(([\d.]+)x smaller", out)
    assert saving and float(saving.group(1)) > 1.5  # half the heads streaming: close to 2x fewer KV bytes
    assert "full attention" in out and "DuoAttention" in out
