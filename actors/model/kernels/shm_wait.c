/* Waiting and waking across processes on a word of shared memory (Linux futexes), for the expert exchange's
 * shared-memory transport (actors/transport.py): a writer stores a message's sequence number with release
 * order and wakes the readers; a reader spins briefly, then sleeps in the kernel until the number is reached,
 * the segment is closed (a peer left: seen within a 20 ms slice), or the deadline passes. Sleeping matters: with more
 * processes than cores, a spinning reader would hold the core its writer needs.
 *
 * Between the two, for up to YIELD_NS, the reader polls and yields its core (sched_yield) to any thread that can
 * run there. On a VM a core whose threads all sleep halts, and waking a thread there took far longer than the
 * work of a small model's layer: on a 2-core KVM Xeon with AMX (model 167), the in-process `tiny` engine's
 * decode step was 6.1 ms with libgomp's spinning workers and 18.6-19 ms with sleeping ones, and the `tiny`
 * cluster's step (front-end and shards taking turns, a few waits a layer) went 16.9-18.1 -> 12.5-12.9 ms with
 * this polling (bf16; fp32, 3 alternating pairs: median 26.8 -> 23.7 ms). The `bench` cluster's step, whose
 * waits last tens of ms, was within the noise (3 alternating pairs; docs/performance.md).
 */
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SPINS 64 /* a few microseconds: a writer already running often arrives within them */
#define YIELD_NS 2000000LL /* then polls, yielding the core, this long before it sleeps */
#define SLICE_NS 20000000LL /* a sleep is cut into slices this long, to notice the closed flag in time */

static long futex(uint32_t *word, int op, uint32_t value, const struct timespec *timeout) {
    return syscall(SYS_futex, word, op, value, timeout, NULL, 0);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait until *word reaches target (sequence numbers: compared modulo 2^32). 0 when it has; -1 when the
 * deadline passed; -2 when *closed became non-zero before *word reached target. */
int shm_wait(uint32_t *word, uint32_t target, int64_t timeout_ns, const uint32_t *closed) {
    const int64_t start = now_ns(), deadline = start + timeout_ns;
    for (int i = 0;; i++) {
        const uint32_t seen = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if ((int32_t)(seen - target) >= 0) return 0;
        if (__atomic_load_n(closed, __ATOMIC_ACQUIRE)) {
            /* A peer may have published and then closed between the two loads: what it published before
             * closing still counts (its close is ordered after its post, so this load sees the post). */
            const uint32_t last = __atomic_load_n(word, __ATOMIC_ACQUIRE);
            return (int32_t)(last - target) >= 0 ? 0 : -2;
        }
        if (i < SPINS) {
            __builtin_ia32_pause();
            continue;
        }
        const int64_t at = now_ns();
        int64_t left = deadline - at;
        if (left <= 0) return -1;
        if (at - start < YIELD_NS) {
            sched_yield();
            continue;
        }
        if (left > SLICE_NS) left = SLICE_NS;
        const struct timespec t = {0, left};
        futex(word, FUTEX_WAIT, seen, &t); /* returns at once if *word already moved on */
    }
}

/* Publish value in *word and wake whoever waits on it. */
void shm_post(uint32_t *word, uint32_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
    futex(word, FUTEX_WAKE, 0x7fffffff, NULL);
}
