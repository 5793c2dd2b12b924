"""Packaging: the wheel ships ``conf/`` and ``zoo/`` and ``import mome`` stays light (the Hydra configs are
tested by tests/test_model_configs.py and tests/test_moe_configs.py)."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The current environment without anything that would put the source tree on ``sys.path``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _env())
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{cmd} failed with exit status {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc


def _pip_has_python_option() -> bool:
    """``pip --python <interpreter>`` exists since pip 22.3."""
    try:
        import pip
    except ImportError:
        return False
    major, minor = (int(part) for part in pip.__version__.split(".")[:2])
    return (major, minor) >= (22, 3)


def test_wheel_ships_conf_and_zoo(tmp_path):
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(dist)]
    )
    (wheel,) = dist.glob("mome-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for member in ("mome/_conf/moe/vmoe.yaml", "mome/_zoo/README.md", "mome/layers/moe.py"):
        assert member in names, f"{member} missing from {wheel.name}: {sorted(names)}"

    # A fresh venv holding only the wheel's mome; torch, timm, ... come from the current interpreter's
    # site-packages through a .pth line, which is appended to sys.path after the venv's own site-packages
    # (and does not process that directory's .pth files, so the repo's editable install stays out).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    if not python.exists():  # Windows layout
        python = venv / "Scripts" / "python.exe"
    fresh_site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    if _pip_has_python_option():
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    else:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(fresh_site)
    (fresh_site / "_mome_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        import mome

        venv = Path(sys.argv[1]).resolve()
        print("mome.__file__", mome.__file__)
        print("conf_dir", mome.conf_dir())
        print("zoo_dir", mome.zoo_dir())
        assert Path(mome.__file__).resolve().is_relative_to(venv), mome.__file__
        conf, zoo = mome.conf_dir().resolve(), mome.zoo_dir().resolve()
        assert conf.is_relative_to(venv) and conf.parts[-2:] == ("mome", "_conf"), conf
        assert zoo.is_relative_to(venv) and zoo.parts[-2:] == ("mome", "_zoo"), zoo
        assert (conf / "moe" / "vmoe.yaml").is_file()
        assert (zoo / "README.md").is_file()
        """
    )
    proc = _run([str(python), "-c", script, str(venv)], cwd=tmp_path)
    assert str(venv.resolve()) in proc.stdout, proc.stdout


def test_import_mome_is_light():
    code = (
        "import mome, sys; "
        "heavy = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')); "
        "assert not heavy, heavy"
    )
    _run([sys.executable, "-c", code], cwd=REPO)
