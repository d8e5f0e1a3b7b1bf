"""Telemetry from the NVIDIA driver through the real pynvml bindings.

Every NVML read goes through `nvml_query`, the one place that decides what an error means
(nvitop's `nvmlQuery`, dcgm-exporter's `isBlankValue`), and every write through `nvml_set`
beside it, which names the refusal instead (the power lever needs to tell NO_PERMISSION from
NOT_SUPPORTED to say why it cannot act):

- NOT_SUPPORTED, NO_DATA, NO_PERMISSION, NOT_FOUND, or an entry point the driver lacks: the field
  is absent (None, so no metric series), never 0. A datacenter card without a fan or a MIG slice
  without utilization must not look like a cold or idle GPU.
- GPU_IS_LOST, RESET_REQUIRED: that GPU's sample has `lost=True` and every other GPU is still
  read; the pressure logic treats a lost GPU as critical.
- anything else: `TelemetryError(name)` fails the whole read, and the sampler counts `name`.

GPU selection. The `gpu` label and `GpuSample.index` are NVML indices (PCI bus order, what
nvidia-smi shows). With no explicit indices, CUDA_VISIBLE_DEVICES narrows the set the way CUDA
reads it: comma-separated integer indices or `GPU-<uuid prefix>` tokens, and the list ends at the
first token that does not resolve (CUDA's rule; `MIG-` tokens therefore end it too). Integers are
taken as NVML indices, which match CUDA's numbering only with CUDA_DEVICE_ORDER=PCI_BUS_ID (or when
all GPUs are the same model, where CUDA's fastest-first order is PCI order); UUIDs are exact on
every machine, so prefer them. When the variable is set but names nothing usable ("", "-1", only
MIG devices) every GPU is watched: a guard that watches nothing would see no samples and hold
pressure at `on_stale` forever. Explicit `gpu_indices` always win.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pynvml

from meltguard.daemon.telemetry.errors import NvmlUnavailable, TelemetryError
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, decode_throttle
from meltguard.protocols import Clock
from meltguard.values import GpuSample

T = TypeVar("T")

_ABSENT = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_NO_DATA,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_NOT_FOUND,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    }
)
# Errors that mean "this driver lacks that entry point": the next, older entry point may work.
_ENTRY_POINT_MISSING = frozenset(
    {pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH}
)
# A card that needs a reset is as gone as one that fell off the bus: nothing it reports is real.
_LOST = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})

_ERROR_NAMES: dict[int, str] = {
    getattr(pynvml, attr): "nvml_" + attr.removeprefix("NVML_ERROR_").lower()
    for attr in dir(pynvml)
    if attr.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, attr), int)
}


def _bindings(*names: str) -> tuple[Callable[..., Any], ...]:
    # Newest first. nvidia-ml-py adds the versioned wrappers over time and will drop the
    # deprecated ones, so take whichever this installed release has.
    return tuple(getattr(pynvml, name) for name in names if hasattr(pynvml, name))


_TEMPERATURE_CALLS = _bindings("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
_REASON_CALLS = _bindings(
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"
)


class GpuLost(Exception):
    """Raised inside nvml_query when the GPU is gone; NvmlSource turns it into `lost=True`."""


def error_name(code: int) -> str:
    """The `error` label for an NVML return code: `nvml_gpu_is_lost`, `nvml_unknown`, ..."""
    return _ERROR_NAMES.get(code, "nvml_unknown")


def nvml_query(*attempts: Callable[[], T]) -> T | None:
    """Run one NVML query and interpret its error; the only place NVML errors are caught.

    `attempts` are the same query through successively older entry points; the next one is tried
    only when the driver lacks the previous one (a newer versioned call on an older driver).
    """
    for position, attempt in enumerate(attempts):
        try:
            return attempt()
        except pynvml.NVMLError as exc:
            code = int(exc.value)
            if code in _ENTRY_POINT_MISSING and position + 1 < len(attempts):
                continue
            if code in _ABSENT:
                return None
            if code in _LOST:
                raise GpuLost(error_name(code)) from exc
            raise TelemetryError(error_name(code), str(exc)) from exc
    return None


def nvml_set(call: Callable[[], object]) -> str:
    """Run one NVML setter: `success`, or the refusal's name as `error_name` spells it
    (`nvml_no_permission`, `nvml_not_supported`, `nvml_gpu_is_lost`, ...). Never raises an
    NVMLError: a setter that fails leaves the card as it was, and the caller decides what next."""
    try:
        call()
    except pynvml.NVMLError as exc:
        return error_name(int(exc.value))
    return "success"


def _text(value: str | bytes) -> str:
    # pynvml returns str on Python 3, but older releases handed back bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class NvmlSource:
    """TelemetrySource over NVML for the selected GPUs; build it with `open_nvml`."""

    def __init__(
        self,
        indices: Sequence[int],
        *,
        clock: Clock,
        driver_version: str | None = None,
        selection_note: str | None = None,
    ) -> None:
        self._indices = tuple(indices)
        self._clock = clock
        self._handles: dict[int, Any] = {}
        # Name and UUID never change while the process lives; caching them lets a lost GPU's
        # sample still say which card it was.
        self._names: dict[int, str] = {}
        self._uuids: dict[int, str] = {}
        self._closed = False
        self.driver_version = driver_version
        self.selection_note = selection_note

    @property
    def kind(self) -> str:
        return "nvml"

    @property
    def indices(self) -> tuple[int, ...]:
        return self._indices

    def read(self) -> Sequence[GpuSample]:
        if self._closed:
            raise TelemetryError("nvml_closed", "read after close()")
        return [self._read_gpu(index) for index in self._indices]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Best effort: the process is ending or falling back anyway.
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = nvml_query(lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
            if handle is not None:
                self._handles[index] = handle
        return handle

    def _read_gpu(self, index: int) -> GpuSample:
        now = self._clock.monotonic()
        try:
            return self._read_handle(index, now)
        except GpuLost:
            # A lost card may come back under a new handle after a reset.
            self._handles.pop(index, None)
            return GpuSample(
                index=index,
                uuid=self._uuids.get(index, ""),
                name=self._names.get(index, ""),
                taken_at=now,
                lost=True,
            )

    def _read_handle(self, index: int, now: float) -> GpuSample:
        handle = self._handle(index)
        if handle is None:
            # No permission on this device node: nothing to say about it, but it is not lost.
            return ThrottleUnknownSample(index=index, uuid="", name="", taken_at=now)
        if index not in self._names:
            name = nvml_query(lambda: pynvml.nvmlDeviceGetName(handle))
            if name is not None:
                self._names[index] = _text(name)
        if index not in self._uuids:
            uuid = nvml_query(lambda: pynvml.nvmlDeviceGetUUID(handle))
            if uuid is not None:
                self._uuids[index] = _text(uuid)
        temperature = nvml_query(
            *(functools.partial(f, handle, pynvml.NVML_TEMPERATURE_GPU) for f in _TEMPERATURE_CALLS)
        )
        slowdown = nvml_query(
            lambda: pynvml.nvmlDeviceGetTemperatureThreshold(
                handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
            )
        )
        shutdown = nvml_query(
            lambda: pynvml.nvmlDeviceGetTemperatureThreshold(
                handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
            )
        )
        # v1 counts driver-reserved memory as used, which is what "can another batch fit" needs.
        memory = nvml_query(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        utilization = nvml_query(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        power_mw = nvml_query(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = nvml_query(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        reasons = nvml_query(*(functools.partial(f, handle) for f in _REASON_CALLS))
        energy_mj = nvml_query(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        fields: dict[str, Any] = {
            "index": index,
            "uuid": self._uuids.get(index, ""),
            "name": self._names.get(index, ""),
            "taken_at": now,
            "temperature_c": None if temperature is None else float(temperature),
            "slowdown_c": _threshold(slowdown),
            "shutdown_c": _threshold(shutdown),
            "memory_used_bytes": None if memory is None else int(memory.used),
            "memory_total_bytes": None if memory is None else int(memory.total),
            "utilization": None if utilization is None else int(utilization.gpu) / 100.0,
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
            "energy_j": None if energy_mj is None else energy_mj / 1000.0,
        }
        if reasons is None:
            return ThrottleUnknownSample(**fields)
        return GpuSample(**fields, throttle=decode_throttle(int(reasons)))


    # ---- the power limit as a lever (protocols.PowerLimits) ----

    def default_power_limit_w(self, gpu: int) -> float | None:
        """The limit the card boots with (nvmlDeviceGetPowerManagementDefaultLimit)."""
        handle = self._lever_handle(gpu)
        if handle is None:
            return None
        milliwatts = nvml_query(lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle))
        return None if milliwatts is None else milliwatts / 1000.0

    def power_limit_range_w(self, gpu: int) -> tuple[float, float] | None:
        """The lowest and highest limit the driver accepts for the card."""
        handle = self._lever_handle(gpu)
        if handle is None:
            return None
        bounds = nvml_query(lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle))
        return None if bounds is None else (bounds[0] / 1000.0, bounds[1] / 1000.0)

    def set_power_limit_w(self, gpu: int, watts: float) -> str:
        """Set the card's power limit; `success` or the refusal's name (see nvml_set)."""
        handle = self._lever_handle(gpu)
        if handle is None:
            return "nvml_no_handle"
        milliwatts = round(watts * 1000)
        return nvml_set(lambda: pynvml.nvmlDeviceSetPowerManagementLimit(handle, milliwatts))

    def _lever_handle(self, gpu: int) -> Any:
        if self._closed or gpu not in self._indices:
            return None
        try:
            return self._handle(gpu)
        except (GpuLost, TelemetryError):
            return None


def _threshold(value: int | None) -> float | None:
    return None if value is None else float(value)


def resolve_visible_devices(spec: str, uuids: Sequence[str | None]) -> tuple[int, ...]:
    """NVML indices named by a CUDA_VISIBLE_DEVICES value, by CUDA's rules (see module doc).

    `uuids[i]` is GPU i's UUID (None when unreadable). Returns () when nothing resolves.
    """
    chosen: list[int] = []
    for raw in spec.split(","):
        token = raw.strip()
        index = _resolve_token(token, uuids)
        if index is None:
            break
        if index not in chosen:
            chosen.append(index)
    return tuple(chosen)


def _resolve_token(token: str, uuids: Sequence[str | None]) -> int | None:
    if token.lstrip("+").isdigit():
        index = int(token)
        return index if index < len(uuids) else None
    if token.upper().startswith("GPU-"):
        wanted = token.lower()
        matches = [i for i, uuid in enumerate(uuids) if uuid and uuid.lower().startswith(wanted)]
        return matches[0] if len(matches) == 1 else None
    return None


def _init_failure_reason(exc: pynvml.NVMLError) -> str:
    code = int(exc.value)
    reasons = {
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
            "NVML library libnvidia-ml.so.1 not found: no NVIDIA driver is installed, or it is not "
            "on the loader path"
        ),
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
            "NVIDIA driver is not loaded (nvmlInit: Driver Not Loaded); is this a GPU machine, "
            "and does the container have the GPU devices?"
        ),
        pynvml.NVML_ERROR_NO_PERMISSION: (
            "no permission to open the NVIDIA device files (/dev/nvidia*)"
        ),
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
            "NVML library and kernel driver versions differ (driver upgraded without a reboot?)"
        ),
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: (
            "libnvidia-ml.so.1 is too old for these bindings (nvmlInitWithFlags missing)"
        ),
    }
    if code in reasons:
        return reasons[code]
    return f"nvmlInit failed: {exc} ({error_name(code)})"


def open_nvml(
    *,
    clock: Clock,
    gpu_indices: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NvmlSource:
    """Initialise NVML and pick the GPUs to watch; raises NvmlUnavailable with a one-line reason.

    `environ` defaults to os.environ and is read only for CUDA_VISIBLE_DEVICES.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(_init_failure_reason(exc)) from exc
    try:
        return _select(clock, gpu_indices, os.environ if environ is None else environ)
    except BaseException:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
        raise


def _select(
    clock: Clock, gpu_indices: Sequence[int] | None, environ: Mapping[str, str]
) -> NvmlSource:
    try:
        count = nvml_query(pynvml.nvmlDeviceGetCount)
        driver = nvml_query(pynvml.nvmlSystemGetDriverVersion)
    except (TelemetryError, GpuLost) as exc:
        raise NvmlUnavailable(f"NVML initialised but cannot count GPUs: {exc}") from exc
    if not count:
        raise NvmlUnavailable("NVML works but reports no GPUs")
    note: str | None = None
    if gpu_indices is not None:
        bad = [i for i in gpu_indices if not 0 <= i < count]
        if bad:
            raise NvmlUnavailable(
                f"GPU index {bad[0]} requested, but NVML sees {count} GPU(s) (0-{count - 1})"
            )
        indices = tuple(dict.fromkeys(gpu_indices))
    elif "CUDA_VISIBLE_DEVICES" in environ:
        spec = environ["CUDA_VISIBLE_DEVICES"]
        uuids = _uuids(count) if "gpu-" in spec.lower() else [None] * count
        indices = resolve_visible_devices(spec, uuids)
        if not indices:
            indices = tuple(range(count))
            note = f"CUDA_VISIBLE_DEVICES={spec!r} names no NVML GPU; watching all {count}"
    else:
        indices = tuple(range(count))
    return NvmlSource(
        indices,
        clock=clock,
        driver_version=None if driver is None else _text(driver),
        selection_note=note,
    )


def _uuids(count: int) -> list[str | None]:
    return [_uuid_of(index) for index in range(count)]


def _uuid_of(index: int) -> str | None:
    try:
        handle = nvml_query(lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
        uuid = None if handle is None else nvml_query(lambda: pynvml.nvmlDeviceGetUUID(handle))
    except (TelemetryError, GpuLost):
        return None
    return None if uuid is None else _text(uuid)
