#include <errno.h>
#include <limits.h>
#include <time.h>
#include "headrace.h"
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* A futex sleep/wake pair costs tens of microseconds on a VM; a short spin
 * catches events that are about to happen anyway. */
static uint32_t wait_spin_us = 20;

void hr_set_wait_spin(uint32_t spin_us) { wait_spin_us = spin_us; }

static inline hr_event *event(void *mem, int ev) { return &((hr_header *)mem)->events[ev]; }

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

uint32_t hr_event_value(void *mem, int ev)
{
    if (ev < 0 || ev >= HR_NEVENTS)
        return 0;
    return __atomic_load_n(&event(mem, ev)->value, __ATOMIC_ACQUIRE);
}

void hr_notify(void *mem, int ev)
{
    if (ev < 0 || ev >= HR_NEVENTS)
        return;
    hr_event *e = event(mem, ev);
    __atomic_add_fetch(&e->value, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&e->waiters, __ATOMIC_SEQ_CST) == 0)
        return;
#ifdef __linux__
    syscall(SYS_futex, &e->value, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
}

int hr_wait(void *mem, int ev, uint32_t seen, int64_t timeout_us)
{
    if (ev < 0 || ev >= HR_NEVENTS)
        return HR_E_INVALID;
    hr_event *e = event(mem, ev);
    int64_t start = now_us();
    int64_t deadline = timeout_us < 0 ? INT64_MAX : start + timeout_us;
    int64_t spin_end = start + wait_spin_us;
    for (int64_t t = start; t < spin_end && t < deadline; t = now_us()) {
        for (int k = 0; k < 64; k++) {
            if (__atomic_load_n(&e->value, __ATOMIC_ACQUIRE) != seen)
                return HR_OK;
            hr_cpu_relax();
        }
    }
    __atomic_add_fetch(&e->waiters, 1, __ATOMIC_SEQ_CST);
    int rc = HR_E_TIMEOUT;
#ifndef __linux__
    int64_t nap = 50;
#endif
    for (;;) {
        if (__atomic_load_n(&e->value, __ATOMIC_SEQ_CST) != seen) {
            rc = HR_OK;
            break;
        }
        int64_t t = now_us();
        if (t >= deadline)
            break;
        int64_t left = deadline - t;
#ifdef __linux__
        struct timespec ts = {.tv_sec = left / 1000000, .tv_nsec = (left % 1000000) * 1000};
        /* Shared (not PRIVATE) futex: the waker is another process. */
        syscall(SYS_futex, &e->value, FUTEX_WAIT, seen, &ts, NULL, 0);
#else
        if (nap > left)
            nap = left;
        struct timespec ts = {.tv_sec = nap / 1000000, .tv_nsec = (nap % 1000000) * 1000};
        nanosleep(&ts, NULL);
        if (nap < 20000)
            nap *= 2;
#endif
    }
    __atomic_sub_fetch(&e->waiters, 1, __ATOMIC_SEQ_CST);
    return rc;
}
