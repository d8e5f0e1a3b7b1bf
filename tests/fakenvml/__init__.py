"""Test rig: a fake libnvidia-ml.so.1 (fake_nvml.c) under the real pynvml bindings.

In-process use (fixture `fake_nvml`): the library is preloaded with ctypes under its SONAME, so
when pynvml later does CDLL("libnvidia-ml.so.1") glibc hands back the already-loaded fake. It
stays loaded for the rest of the process; with FAKE_NVML_STATE unset it reports what a machine
without a driver reports (LIBRARY_NOT_FOUND), so later tests see the machine as it is.

Subprocess use: `fake_nvml.env()` gives LD_LIBRARY_PATH and FAKE_NVML_STATE for the child.

State is a dict written to the file the library re-reads on every call; the key format is
documented at the top of fake_nvml.c (`gpu_count`, `init_error`, `0.temperature`,
`0.temperature.error`, `1.lost`, `0.temperature.hang_ms`, ...).

Power limits the daemon sets land in a second file the library appends to (`FakeNvml.limits_set`
reads it back), so the test's own rewrites of the state never erase what the driver holds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("fake_nvml.c")
SONAME = "libnvidia-ml.so.1"

# NVML return codes the tests inject (nvml.h: nvmlReturn_t).
NOT_SUPPORTED = 3
NO_PERMISSION = 4
INVALID_ARGUMENT = 2
DRIVER_NOT_LOADED = 9
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
UNKNOWN = 999

StateValue = str | int | float

DEFAULT_STATE: dict[str, StateValue] = {"gpu_count": 2, "driver_version": "550.54.15"}


class FakeNvmlUnavailable(Exception):
    """The rig cannot be built here (no gcc, no nvml.h); tests skip with this reason."""


def find_nvml_header() -> Path | None:
    """nvml.h from $NVML_INCLUDE_DIR, the nvidia-nvml-dev wheel, or a CUDA install."""
    candidates: list[Path] = []
    if os.environ.get("NVML_INCLUDE_DIR"):
        candidates.append(Path(os.environ["NVML_INCLUDE_DIR"]) / "nvml.h")
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        # The wheel's layout moves with the CUDA major: nvidia/cu13/include, nvidia/nvml/include.
        candidates.extend(sorted(Path(root).glob("*/include/nvml.h"), reverse=True))
        candidates.append(Path(root) / "include" / "nvml.h")
    candidates += [Path("/usr/local/cuda/include/nvml.h"), Path("/usr/include/nvml.h")]
    return next((path for path in candidates if path.is_file()), None)


def build_library(out_dir: Path) -> Path:
    """Compile the fake into out_dir/libnvidia-ml.so.1; raises FakeNvmlUnavailable."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise FakeNvmlUnavailable("no C compiler (gcc) to build the fake libnvidia-ml.so.1")
    header = find_nvml_header()
    if header is None:
        raise FakeNvmlUnavailable("nvml.h not found (pip install nvidia-nvml-dev)")
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / SONAME
    command = [
        gcc,
        "-std=c11",
        "-D_POSIX_C_SOURCE=200809L",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-deprecated-declarations",  # the fake must still provide the deprecated entry points
        "-O1",
        "-shared",
        "-fPIC",
        f"-Wl,-soname,{SONAME}",
        f"-I{header.parent}",
        str(SOURCE),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # A compile error is a bug in the rig or a changed nvml.h: fail loudly, never skip.
        raise RuntimeError(f"building the fake NVML failed:\n{' '.join(command)}\n{result.stderr}")
    return library


class FakeNvml:
    """One fake machine: the built library plus a state file this object owns."""

    def __init__(self, library: Path, state_path: Path) -> None:
        self.library = library.resolve()
        self.state_path = state_path
        self._state: dict[str, StateValue] = {}

    @property
    def lib_dir(self) -> Path:
        return self.library.parent

    @property
    def state(self) -> dict[str, StateValue]:
        return dict(self._state)

    def write(self, state: Mapping[str, StateValue]) -> None:
        """Replace the whole state."""
        self._state = dict(state)
        self._flush()

    def update(self, changes: Mapping[str, StateValue | None]) -> None:
        """Set keys; a value of None removes the key (ends a hang, clears an injected error)."""
        for key, value in changes.items():
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = value
        self._flush()

    def remove(self, *keys: str) -> None:
        self.update(dict.fromkeys(keys))

    @property
    def set_path(self) -> Path:
        return self.state_path.with_name(self.state_path.name + ".set")

    def limits_set(self, gpu: int = 0) -> list[int]:
        """Every power limit (mW) nvmlDeviceSetPowerManagementLimit accepted for `gpu`, in order."""
        if not self.set_path.exists():
            return []
        prefix = f"{gpu}.power_limit_mw="
        return [
            int(line.removeprefix(prefix))
            for line in self.set_path.read_text().splitlines()
            if line.startswith(prefix)
        ]

    def clear_hangs(self) -> bool:
        """End every injected hang; True if there was one."""
        hangs = [key for key in self._state if key.endswith(".hang_ms")]
        self.remove(*hangs)
        return bool(hangs)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that should load this fake instead of a real driver."""
        env = dict(os.environ if base is None else base)
        previous = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{self.lib_dir}:{previous}" if previous else str(self.lib_dir)
        env["FAKE_NVML_STATE"] = str(self.state_path)
        return env

    def preload(self) -> None:
        """Make this process's pynvml use the fake; skips if pynvml already holds another one."""
        handle = ctypes.CDLL(str(self.library), mode=ctypes.RTLD_GLOBAL)
        import pynvml

        loaded = pynvml.nvmlLib
        if loaded is not None and getattr(loaded, "_handle", None) != handle._handle:
            pytest.skip("pynvml in this process already loaded a real libnvidia-ml.so.1")

    def _flush(self) -> None:
        text = "".join(f"{key}={value}\n" for key, value in self._state.items())
        # Atomic replace: the library re-reads the file on every call, from other threads too.
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_path)


_BUILT: list[Path] = []


@pytest.fixture(scope="session")
def fake_nvml_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake libnvidia-ml.so.1, built once per test process.

    Several conftests import this fixture, and pytest gives each import its own session
    instance; they must still share one library, because pynvml binds the first one a
    process loads and a second copy at another path would be a different library."""
    if not _BUILT:
        try:
            _BUILT.append(build_library(tmp_path_factory.mktemp("fakenvml")))
        except FakeNvmlUnavailable as exc:
            pytest.skip(str(exc))
    return _BUILT[0]


@pytest.fixture
def fake_nvml(
    fake_nvml_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeNvml]:
    """A fake two-GPU machine, preloaded in-process, with FAKE_NVML_STATE pointing at it."""
    fake = FakeNvml(fake_nvml_library, tmp_path / "nvml-state")
    fake.write(DEFAULT_STATE)
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    fake.preload()
    yield fake
    # Let a reader thread still polling a hang see it end before the environment changes under
    # it (getenv racing setenv in C is undefined behaviour).
    if fake.clear_hangs():
        time.sleep(0.05)
