"""The README's Python example runs as written (in a temporary folder)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2  # the dense pair, then a custom sparse student from the same teacher
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "api-student" / "checkpoints" / "last.safetensors").is_file()
    assert (tmp_path / "runs" / "api-sparse" / "checkpoints" / "last.safetensors").is_file()
    assert "'student'" in capsys.readouterr().out
