/*
 * A fake libnvidia-ml.so.1 for tests: the real pynvml bindings load it through ctypes exactly as
 * they load the driver's library, so the daemon's NVML code runs unmodified, errors included.
 *
 * Built against the real nvml.h so every signature and struct layout is the driver's own; a
 * mismatch is a compile error rather than a silently wrong test.
 *
 * State lives in the file named by $FAKE_NVML_STATE and is re-read on every call, so a test can
 * change temperatures or inject errors between two reads of a running daemon. Format: one
 * `key=value` per line, `#` starts a comment. Keys (N is a GPU index):
 *
 *   init_error=9            nvmlInit* returns this code (9 = NVML_ERROR_DRIVER_NOT_LOADED)
 *   gpu_count=2             devices reported by nvmlDeviceGetCount
 *   driver_version=550.54.15
 *   count.error / count.hang_ms
 *   N.lost=1                every call on GPU N returns NVML_ERROR_GPU_IS_LOST (15)
 *   N.name  N.uuid  N.temperature  N.slowdown  N.shutdown          (degrees C)
 *   N.memory_total  N.memory_used  N.memory_reserved               (bytes)
 *   N.util_gpu  N.util_memory                                      (percent)
 *   N.power_mw  N.power_limit_mw  N.clocks_reasons (decimal or 0x hex bitmask)
 *   N.power_default_limit_mw (700000)  N.power_min_limit_mw (200000)  N.power_max_limit_mw (700000)
 *   N.energy_mj             nvmlDeviceGetTotalEnergyConsumption, millijoules (default 0)
 *   unprivileged=1          every setter returns NVML_ERROR_NO_PERMISSION, as for a non-root user
 *   N.CALL.error=CODE       CALL returns CODE instead of a value
 *   N.CALL.hang_ms=MS       CALL blocks until the key is removed from the file or MS elapse
 *
 * CALL is one of: handle name uuid index temperature slowdown shutdown memory utilization power
 * power_limit clocks_event_reasons clocks_throttle_reasons power_default_limit
 * power_limit_constraints power_management_limit energy set_power_limit.
 *
 * Setters write what the driver would hold to a second file, $FAKE_NVML_STATE.set, one
 * `N.power_limit_mw=VALUE` line appended per successful nvmlDeviceSetPowerManagementLimit, so a
 * test reads back every limit the daemon set, in order, and the test's own rewrites of the state
 * file never erase one. The limit in force (enforced and management limit) is the last line there
 * for that GPU, else N.power_limit_mw from the state, else the default limit.
 *
 * No state file (or $FAKE_NVML_STATE unset) makes nvmlInit fail with LIBRARY_NOT_FOUND, exactly
 * what pynvml reports on a machine without the driver: once a test process has preloaded this
 * library it cannot unload it, and every later test must still see the machine as it really is.
 */
#define NVML_NO_UNVERSIONED_FUNC_DEFS
#include <nvml.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ENTRIES 512
#define MAX_KEY 96
#define MAX_VALUE 160
#define MAX_GPUS 64

struct nvmlDevice_st {
    unsigned int index;
};

typedef struct {
    int present; /* 0 when the file is missing: the process is not under test */
    int count;
    char keys[MAX_ENTRIES][MAX_KEY];
    char values[MAX_ENTRIES][MAX_VALUE];
} state_t;

static struct nvmlDevice_st devices[MAX_GPUS];
static int init_refcount = 0;

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r')) {
        s[--n] = '\0';
    }
    return s;
}

/* Heap-allocated because the table is ~130 KiB and callers run on small worker-thread stacks. */
static state_t *load_state(void) {
    state_t *st = calloc(1, sizeof(state_t));
    if (st == NULL) return NULL;
    const char *path = getenv("FAKE_NVML_STATE");
    if (path == NULL || *path == '\0') return st;
    FILE *f = fopen(path, "r");
    if (f == NULL) return st;
    st->present = 1;
    char line[MAX_KEY + MAX_VALUE + 8];
    while (fgets(line, sizeof line, f) != NULL && st->count < MAX_ENTRIES) {
        char *hash = strchr(line, '#');
        if (hash != NULL) *hash = '\0';
        char *eq = strchr(line, '=');
        if (eq == NULL) continue;
        *eq = '\0';
        char *key = trim(line);
        char *value = trim(eq + 1);
        if (*key == '\0') continue;
        snprintf(st->keys[st->count], MAX_KEY, "%s", key);
        snprintf(st->values[st->count], MAX_VALUE, "%s", value);
        st->count++;
    }
    fclose(f);
    return st;
}

/* Last assignment wins, as a person editing the file by hand would expect. */
static const char *lookup(const state_t *st, const char *key) {
    for (int i = st->count - 1; i >= 0; i--) {
        if (strcmp(st->keys[i], key) == 0) return st->values[i];
    }
    return NULL;
}

static unsigned long long get_ull(const state_t *st, const char *key, unsigned long long dflt) {
    const char *v = lookup(st, key);
    return v == NULL ? dflt : strtoull(v, NULL, 0);
}

static const char *gpu_key(char *buf, size_t n, unsigned int gpu, const char *field) {
    snprintf(buf, n, "%u.%s", gpu, field);
    return buf;
}

static unsigned long long gpu_ull(const state_t *st, unsigned int gpu, const char *field,
                                  unsigned long long dflt) {
    char key[MAX_KEY];
    return get_ull(st, gpu_key(key, sizeof key, gpu, field), dflt);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/*
 * Block while `<prefix>.hang_ms` stays in the file, at most that many milliseconds. Polling lets a
 * test end the hang by rewriting the state, so a stuck worker thread never outlives the test.
 */
static void maybe_hang(const char *prefix) {
    char key[MAX_KEY + 16];
    snprintf(key, sizeof key, "%s.hang_ms", prefix);
    state_t *st = load_state();
    if (st == NULL) return;
    long budget = (long)get_ull(st, key, 0);
    free(st);
    for (long waited = 0; waited < budget; waited += 10) {
        sleep_ms(10);
        st = load_state();
        if (st == NULL) return;
        long still = (long)get_ull(st, key, 0);
        free(st);
        if (still <= 0) return;
    }
}

static int injected_error(const state_t *st, const char *prefix) {
    char key[MAX_KEY + 16];
    snprintf(key, sizeof key, "%s.error", prefix);
    return (int)get_ull(st, key, 0);
}

static unsigned int gpu_count(const state_t *st) {
    unsigned long long n = get_ull(st, "gpu_count", 1);
    return n > MAX_GPUS ? MAX_GPUS : (unsigned int)n;
}

/*
 * Common prologue of every device call: hang if asked, then re-read the state and return the
 * first error that applies (uninitialized, bad handle, lost GPU, injected error). On success
 * *out holds the fresh state and *gpu the device index; the caller frees *out.
 */
static nvmlReturn_t device_call(nvmlDevice_t device, const char *call, state_t **out,
                                unsigned int *gpu) {
    *out = NULL;
    if (__atomic_load_n(&init_refcount, __ATOMIC_SEQ_CST) <= 0) return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || device < &devices[0] || device >= &devices[MAX_GPUS]) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *gpu = device->index;
    char prefix[MAX_KEY];
    snprintf(prefix, sizeof prefix, "%u.%s", *gpu, call);
    maybe_hang(prefix);
    state_t *st = load_state();
    if (st == NULL) return NVML_ERROR_MEMORY;
    if (!st->present) {
        free(st);
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    if (*gpu >= gpu_count(st)) {
        free(st);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (gpu_ull(st, *gpu, "lost", 0)) {
        free(st);
        return NVML_ERROR_GPU_IS_LOST;
    }
    int err = injected_error(st, prefix);
    if (err != 0) {
        free(st);
        return (nvmlReturn_t)err;
    }
    *out = st;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(const char *value, char *dst, unsigned int length) {
    if (dst == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

/* ---- library lifetime ---------------------------------------------------------------------- */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    state_t *st = load_state();
    if (st == NULL) return NVML_ERROR_MEMORY;
    nvmlReturn_t ret = NVML_SUCCESS;
    if (!st->present) {
        ret = NVML_ERROR_LIBRARY_NOT_FOUND;
    } else {
        ret = (nvmlReturn_t)get_ull(st, "init_error", 0);
    }
    free(st);
    if (ret == NVML_SUCCESS) __atomic_add_fetch(&init_refcount, 1, __ATOMIC_SEQ_CST);
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    int now = __atomic_sub_fetch(&init_refcount, 1, __ATOMIC_SEQ_CST);
    if (now < 0) {
        __atomic_store_n(&init_refcount, 0, __ATOMIC_SEQ_CST);
        return NVML_ERROR_UNINITIALIZED;
    }
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
        case NVML_SUCCESS: return "Success";
        case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
        case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
        case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
        case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
        case NVML_ERROR_NOT_FOUND: return "Not Found";
        case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
        case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
        case NVML_ERROR_TIMEOUT: return "Timeout";
        case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
        case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
        case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
        case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
        case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
        case NVML_ERROR_NO_DATA: return "No data";
        case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Version Mismatch";
        default: return "Unknown Error";
    }
}

/* ---- system ---------------------------------------------------------------------------------- */

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (__atomic_load_n(&init_refcount, __ATOMIC_SEQ_CST) <= 0) return NVML_ERROR_UNINITIALIZED;
    state_t *st = load_state();
    if (st == NULL) return NVML_ERROR_MEMORY;
    const char *v = lookup(st, "driver_version");
    nvmlReturn_t ret = copy_string(v == NULL ? "550.54.15" : v, version, length);
    free(st);
    return ret;
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    return copy_string("12.550.54.15", version, length);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    if (__atomic_load_n(&init_refcount, __ATOMIC_SEQ_CST) <= 0) return NVML_ERROR_UNINITIALIZED;
    if (deviceCount == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    maybe_hang("count");
    state_t *st = load_state();
    if (st == NULL) return NVML_ERROR_MEMORY;
    int err = injected_error(st, "count");
    if (err == 0) *deviceCount = gpu_count(st);
    free(st);
    return (nvmlReturn_t)err;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount) { return nvmlDeviceGetCount_v2(deviceCount); }

/* ---- handles ---------------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (device == NULL || index >= MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    devices[index].index = index;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(&devices[index], "handle", &st, &gpu);
    free(st);
    if (ret == NVML_SUCCESS) *device = &devices[index];
    return ret;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "index", &st, &gpu);
    if (ret == NVML_SUCCESS) *index = gpu;
    free(st);
    return ret;
}

/* ---- identity --------------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "name", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    char key[MAX_KEY];
    const char *v = lookup(st, gpu_key(key, sizeof key, gpu, "name"));
    ret = copy_string(v == NULL ? "NVIDIA H100 80GB HBM3" : v, name, length);
    free(st);
    return ret;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "uuid", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    char key[MAX_KEY];
    char dflt[64];
    snprintf(dflt, sizeof dflt, "GPU-fa4e0000-0000-4000-8000-%012u", gpu);
    const char *v = lookup(st, gpu_key(key, sizeof key, gpu, "uuid"));
    ret = copy_string(v == NULL ? dflt : v, uuid, length);
    free(st);
    return ret;
}

/* ---- temperature ------------------------------------------------------------------------------ */

static nvmlReturn_t read_temperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensor,
                                     unsigned int *temp) {
    if (temp == NULL || sensor != NVML_TEMPERATURE_GPU) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "temperature", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *temp = (unsigned int)gpu_ull(st, gpu, "temperature", 40);
    free(st);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType,
                                      unsigned int *temp) {
    return read_temperature(device, sensorType, temp);
}

nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temperature) {
    if (temperature == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (temperature->version != nvmlTemperature_v1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned int t = 0;
    nvmlReturn_t ret = read_temperature(device, temperature->sensorType, &t);
    if (ret == NVML_SUCCESS) temperature->temperature = (int)t;
    return ret;
}

nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device,
                                               nvmlTemperatureThresholds_t thresholdType,
                                               unsigned int *temp) {
    const char *call;
    unsigned long long dflt;
    switch (thresholdType) {
        case NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: call = "slowdown"; dflt = 87; break;
        case NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: call = "shutdown"; dflt = 92; break;
        default: return NVML_ERROR_NOT_SUPPORTED;
    }
    if (temp == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, call, &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *temp = (unsigned int)gpu_ull(st, gpu, call, dflt);
    free(st);
    return NVML_SUCCESS;
}

/* ---- memory ----------------------------------------------------------------------------------- */

#define DEFAULT_MEMORY_TOTAL 85520809984ULL /* 81559 MiB, what an H100 80GB reports */
#define DEFAULT_MEMORY_USED 559939584ULL    /* 534 MiB: driver bookkeeping on an idle card */

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "memory", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    memory->total = gpu_ull(st, gpu, "memory_total", DEFAULT_MEMORY_TOTAL);
    /* v1 folds reserved memory into `used`, as the real driver does. */
    memory->used = gpu_ull(st, gpu, "memory_used", DEFAULT_MEMORY_USED) +
                   gpu_ull(st, gpu, "memory_reserved", 0);
    memory->free = memory->total > memory->used ? memory->total - memory->used : 0;
    free(st);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "memory", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    memory->total = gpu_ull(st, gpu, "memory_total", DEFAULT_MEMORY_TOTAL);
    memory->reserved = gpu_ull(st, gpu, "memory_reserved", 0);
    memory->used = gpu_ull(st, gpu, "memory_used", DEFAULT_MEMORY_USED);
    unsigned long long taken = memory->used + memory->reserved;
    memory->free = memory->total > taken ? memory->total - taken : 0;
    free(st);
    return NVML_SUCCESS;
}

/* ---- utilization, power, clocks --------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    if (utilization == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "utilization", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    utilization->gpu = (unsigned int)gpu_ull(st, gpu, "util_gpu", 0);
    utilization->memory = (unsigned int)gpu_ull(st, gpu, "util_memory", 0);
    free(st);
    return NVML_SUCCESS;
}

static nvmlReturn_t read_uint(nvmlDevice_t device, const char *call, const char *field,
                              unsigned long long dflt, unsigned int *out) {
    if (out == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, call, &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *out = (unsigned int)gpu_ull(st, gpu, field, dflt);
    free(st);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    return read_uint(device, "power", "power_mw", 70000, power);
}

static nvmlReturn_t read_reasons(nvmlDevice_t device, const char *call,
                                 unsigned long long *reasons) {
    if (reasons == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, call, &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *reasons = gpu_ull(st, gpu, "clocks_reasons", nvmlClocksEventReasonGpuIdle);
    free(st);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                    unsigned long long *clocksEventReasons) {
    return read_reasons(device, "clocks_event_reasons", clocksEventReasons);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                       unsigned long long *clocksThrottleReasons) {
    return read_reasons(device, "clocks_throttle_reasons", clocksThrottleReasons);
}

/* ---- power management limits and energy ------------------------------------------------------ */

#define DEFAULT_POWER_LIMIT_MW 700000ULL /* an H100 SXM's default limit */
#define DEFAULT_POWER_MIN_MW 200000ULL
#define DEFAULT_POWER_MAX_MW 700000ULL

static int set_path(char *buf, size_t n) {
    const char *path = getenv("FAKE_NVML_STATE");
    if (path == NULL || *path == '\0') return 0;
    snprintf(buf, n, "%s.set", path);
    return 1;
}

/* The limit a setter left in force for GPU `gpu`, or `dflt` when none has been set. */
static unsigned long long set_limit(unsigned int gpu, unsigned long long dflt) {
    char path[4096];
    if (!set_path(path, sizeof path)) return dflt;
    FILE *f = fopen(path, "r");
    if (f == NULL) return dflt;
    char want[MAX_KEY];
    snprintf(want, sizeof want, "%u.power_limit_mw=", gpu);
    char line[MAX_KEY + MAX_VALUE];
    unsigned long long value = dflt;
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, want, strlen(want)) == 0) value = strtoull(line + strlen(want), NULL, 0);
    }
    fclose(f);
    return value;
}

static unsigned long long limit_in_force(const state_t *st, unsigned int gpu) {
    unsigned long long dflt = gpu_ull(st, gpu, "power_default_limit_mw", DEFAULT_POWER_LIMIT_MW);
    return set_limit(gpu, gpu_ull(st, gpu, "power_limit_mw", dflt));
}

static nvmlReturn_t read_limit(nvmlDevice_t device, const char *call, unsigned int *limit) {
    if (limit == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, call, &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *limit = (unsigned int)limit_in_force(st, gpu);
    free(st);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    return read_limit(device, "power_limit", limit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    return read_limit(device, "power_management_limit", limit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                      unsigned int *defaultLimit) {
    return read_uint(device, "power_default_limit", "power_default_limit_mw",
                     DEFAULT_POWER_LIMIT_MW, defaultLimit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device,
                                                          unsigned int *minLimit,
                                                          unsigned int *maxLimit) {
    if (minLimit == NULL || maxLimit == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "power_limit_constraints", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *minLimit = (unsigned int)gpu_ull(st, gpu, "power_min_limit_mw", DEFAULT_POWER_MIN_MW);
    *maxLimit = (unsigned int)gpu_ull(st, gpu, "power_max_limit_mw", DEFAULT_POWER_MAX_MW);
    free(st);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit) {
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "set_power_limit", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (get_ull(st, "unprivileged", 0)) {
        free(st);
        return NVML_ERROR_NO_PERMISSION;
    }
    unsigned long long low = gpu_ull(st, gpu, "power_min_limit_mw", DEFAULT_POWER_MIN_MW);
    unsigned long long high = gpu_ull(st, gpu, "power_max_limit_mw", DEFAULT_POWER_MAX_MW);
    free(st);
    /* The driver refuses a limit outside the constraints rather than clamping it. */
    if (limit < low || limit > high) return NVML_ERROR_INVALID_ARGUMENT;
    char path[4096];
    if (!set_path(path, sizeof path)) return NVML_ERROR_UNKNOWN;
    FILE *f = fopen(path, "a");
    if (f == NULL) return NVML_ERROR_UNKNOWN;
    fprintf(f, "%u.power_limit_mw=%u\n", gpu, limit);
    fclose(f);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy) {
    if (energy == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    state_t *st = NULL;
    unsigned int gpu = 0;
    nvmlReturn_t ret = device_call(device, "energy", &st, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *energy = gpu_ull(st, gpu, "energy_mj", 0);
    free(st);
    return NVML_SUCCESS;
}
