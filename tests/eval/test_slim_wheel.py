"""eval/slim_wheel.py: a wheel without the unused model folders still installs, with a RECORD that matches its files."""

import csv
import io
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import slim_wheel  # noqa: E402

FILES = {
    "fakepkg/__init__.py": "VERSION = '1.0'\n",
    "fakepkg/models/__init__.py": "",
    "fakepkg/models/umt5/__init__.py": "NAME = 'umt5'\n",
    "fakepkg/models/bert/__init__.py": "NAME = 'bert'\n",
    "fakepkg/models/bert/big.py": "x = 1\n" * 1000,
    "fakepkg/utils/models/bert.py": "NAME = 'kept: not a model folder of the package'\n",
}


def fake_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in FILES.items():
            wheel.writestr(name, text)
        wheel.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
        wheel.writestr("fakepkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                       "Tag: py3-none-any\n")
        record = [f"{name},," for name in FILES] + ["fakepkg-1.0.dist-info/METADATA,,",
                                                   "fakepkg-1.0.dist-info/WHEEL,,", "fakepkg-1.0.dist-info/RECORD,,"]
        wheel.writestr("fakepkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def test_the_cut_wheel_drops_unkept_model_folders_and_installs(tmp_path):
    source = tmp_path / "in" / "fakepkg-1.0-py3-none-any.whl"
    source.parent.mkdir()
    fake_wheel(source)
    assert slim_wheel.main([str(source), str(tmp_path / "out"), "--keep", "umt5"]) == 0
    cut = tmp_path / "out" / source.name
    with zipfile.ZipFile(cut) as wheel:
        names = set(wheel.namelist())
        record = {row[0] for row in csv.reader(io.StringIO(wheel.read("fakepkg-1.0.dist-info/RECORD").decode()))}
    assert "fakepkg/models/umt5/__init__.py" in names and "fakepkg/utils/models/bert.py" in names
    assert not any(name.startswith("fakepkg/models/bert/") for name in names)
    assert record == names  # every file listed, nothing listed that is gone
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(site), str(cut)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = "import fakepkg.models.umt5 as m; print(m.NAME); import importlib.util as u; " \
            "print(u.find_spec('fakepkg.models.bert'))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(site)}).stdout.split()
    assert out == ["umt5", "None"]


def test_a_wrong_path_is_one_line_and_exit_2(tmp_path, capsys):
    assert slim_wheel.main([str(tmp_path / "nothing.whl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_the_docstring_example_runs():
    import doctest

    assert doctest.testmod(slim_wheel).failed == 0
