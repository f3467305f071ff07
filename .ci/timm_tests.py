#!/usr/bin/env python
"""Run timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) on visionzoo's models.

    python .ci/timm_tests.py                      # every kind below, every visionzoo model
    python .ci/timm_tests.py --kinds forward_fx,backward_fx --models 'coc_*' -- -x -q

The sdist of the installed timm version is downloaded once (``pip download --no-deps --no-binary :all:``) into
``--cache`` (default ``~/.cache/visionzoo/timm-tests/<version>``); only its ``tests/test_models.py`` is kept.
``.ci/timm_conftest.py`` is placed beside it as ``conftest.py``: it imports visionzoo and restricts the run to
visionzoo's registered names. Extra arguments after ``--`` go to pytest. Exit status is pytest's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("forward", "backward", "default_cfgs", "default_cfgs_non_std", "forward_features",
         "forward_intermediates_features", "forward_intermediates", "forward_fx", "backward_fx")


def installed_timm_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import timm; print(timm.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def fetch_test_models(version: str, cache: Path) -> Path:
    """``tests/test_models.py`` of timm ``version``'s sdist, downloaded into ``cache`` once."""
    target = cache / "test_models.py"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--quiet", "-d", tmp, f"timm=={version}"], check=True)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if not sdists:
            sys.exit(f"pip download left no timm sdist in {tmp}")
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py")), None)
            if member is None:
                sys.exit(f"{sdists[0].name} has no tests/test_models.py")
            src = tar.extractfile(member)
            tmp_target = target.with_suffix(".tmp")
            tmp_target.write_bytes(src.read())
            tmp_target.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated test kinds (test name without test_model_); default: {','.join(KINDS)}")
    p.add_argument("--models", default="", help="comma-separated fnmatch patterns of visionzoo names (default all)")
    p.add_argument("--cache", type=Path, default=None, help="where the sdist's test file is kept")
    p.add_argument("--timm-version", default=None, help="default: the installed timm's version")
    args = p.parse_args(argv)
    unknown = [k for k in args.kinds.split(",") if k and k not in KINDS]
    if unknown:
        p.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")

    version = args.timm_version or installed_timm_version()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = args.cache or cache_root / "visionzoo" / "timm-tests" / version
    test_file = fetch_test_models(version, cache)
    shutil.copyfile(HERE / "timm_conftest.py", cache / "conftest.py")
    (cache / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")

    env = dict(os.environ, VISIONZOO_TIMM_KINDS=args.kinds, VISIONZOO_TIMM_MODELS=args.models)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-c", str(cache / "pytest.ini"), "--rootdir", str(cache),
           str(test_file), *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=cache, env=env)


if __name__ == "__main__":
    sys.exit(main())
