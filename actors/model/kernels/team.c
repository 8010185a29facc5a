/* One thread per CPU for an OpenMP team (actors/model/cpu_threads.py ``bind_team``): thread i of the calling
 * thread's team, the calling thread itself being thread 0, runs on cpus[i % n] only from now on. A team that
 * keeps its threads on their CPUs never has one of its workers woken onto the core of the thread that woke it,
 * which a scheduler does when the other cores are busy (another process sharing them) and which makes the two
 * take turns on one core for the rest of the parallel region.
 */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>

/* 0 when every thread of the team took its CPU, -1 when one could not (a CPU outside the process's set). */
int bind_team(const int *cpus, int n, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[omp_get_thread_num() % n], &set);
        failed |= sched_setaffinity(0, sizeof set, &set) != 0;
    }
    return failed ? -1 : 0;
}
