#define _GNU_SOURCE  /* sched_getaffinity, CPU_COUNT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "headrace.h"
#ifdef __linux__
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#endif

/* A futex sleep/wake pair costs tens of microseconds on a VM; a short spin
 * catches events that are about to happen anyway. */
static uint32_t wait_spin_us = 20;
/* Spinners allowed at once: one core is always left to the process being
 * waited for, and the writer (waiting on HR_EV_WRITER, the hub every
 * submit passes through) may spin where others may not: they get a token
 * only with a core to spare besides the writer's.  On 2 cores, spinning
 * producers took the writer's core and halved the commit rate of 4 of
 * them, and a spinning producer or worker held the core that a woken
 * process then waited for a time slice to get (the end-to-end p99 was
 * 4-5 ms with them spinning, 0.6 ms without).  The writer's and a
 * committing producer's shares also follow the machine's load: see
 * hr_spin_slots. */
static int spin_slots = -1;

void hr_set_wait_spin(uint32_t spin_us) { wait_spin_us = spin_us; }

static long ncpu = -1;

long hr_quota_cpus(const char *cpu_max)
{
    /* cgroup v2 cpu.max: "max 100000" (no limit) or "QUOTA PERIOD" */
    if (strncmp(cpu_max, "max", 3) == 0 && (cpu_max[3] == ' ' || cpu_max[3] == '\n' || cpu_max[3] == 0))
        return 0;
    char *end;
    long quota = strtol(cpu_max, &end, 10);
    if (end == cpu_max || *end != ' ' || quota <= 0)
        return -1;
    const char *p = end + 1;
    long period = strtol(p, &end, 10);
    if (end == p || period <= 0)
        return -1;
    return (quota + period - 1) / period;
}

long hr_quota_cpus_v1(const char *quota_us, const char *period_us)
{
    /* cgroup v1 cpu.cfs_quota_us ("-1": no limit) and cpu.cfs_period_us */
    char *end;
    long quota = strtol(quota_us, &end, 10);
    if (end == quota_us || (*end && *end != '\n'))
        return -1;
    if (quota == -1)
        return 0;
    long period = strtol(period_us, &end, 10);
    if (quota <= 0 || end == period_us || (*end && *end != '\n') || period <= 0)
        return -1;
    return (quota + period - 1) / period;
}

#ifdef __linux__
/* The text of small file `path` (NUL-terminated), or 0 bytes read. */
static ssize_t read_small(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    return n;
}

/* The tighter of two CPU counts, 0 (or less) meaning no limit. */
static long tighter(long best, long q)
{
    return q > 0 && (best <= 0 || q < best) ? q : best;
}

/* The tightest CPU quota on cgroup `cgroup` and its ancestors, in whole CPUs
 * (rounded up), 0 where none is set: cgroup v2's cpu.max under `root`, or
 * (`v1`) the cfs files of the cpu controller mounted at `root`. */
static long tightest_quota(const char *root, const char *cgroup, int v1)
{
    char dir[1024], path[1280], text[64], period[64];
    snprintf(dir, sizeof dir, "%s", cgroup);
    long best = 0;
    for (;;) {
        const char *d = strcmp(dir, "/") == 0 ? "" : dir;
        long q = -1;
        if (!v1) {
            snprintf(path, sizeof path, "%s%s/cpu.max", root, d);
            if (read_small(path, text, sizeof text) > 0)
                q = hr_quota_cpus(text);
        } else {
            snprintf(path, sizeof path, "%s%s/cpu.cfs_quota_us", root, d);
            if (read_small(path, text, sizeof text) > 0) {
                snprintf(path, sizeof path, "%s%s/cpu.cfs_period_us", root, d);
                if (read_small(path, period, sizeof period) > 0)
                    q = hr_quota_cpus_v1(text, period);
            }
        }
        best = tighter(best, q);
        char *slash = strrchr(dir, '/');
        if (!slash || slash == dir)
            break;
        *slash = 0;
    }
    return best;
}

/* The tightest CPU quota on this process's cgroups, v2 and v1 (a hybrid
 * host has both), in whole CPUs; 0 where none is set. */
static long cgroup_cpus(void)
{
    char cg[2048];
    if (read_small("/proc/self/cgroup", cg, sizeof cg) <= 0)
        return 0;
    long best = 0;
    for (char *line = cg, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        /* "ID:CONTROLLERS:PATH"; v2's line is "0::PATH" */
        char *c = strchr(line, ':'), *dir = c ? strchr(c + 1, ':') : NULL;
        if (!dir)
            continue;
        *dir++ = 0;
        const char *ctrl = c + 1;
        long q = 0;
        if (!*ctrl) {
            q = tightest_quota("/sys/fs/cgroup", dir, 0);
        } else {
            int cpu = 0; /* is "cpu" one of the comma-separated controllers? */
            for (const char *p = ctrl; *p;) {
                size_t len = strcspn(p, ",");
                if (len == 3 && !strncmp(p, "cpu", 3))
                    cpu = 1;
                p += len + (p[len] == ',');
            }
            if (cpu) {
                char root[256];
                snprintf(root, sizeof root, "/sys/fs/cgroup/%s", ctrl);
                q = tightest_quota(root, dir, 1);
                if (!q && strcmp(ctrl, "cpu") != 0) /* mounted as .../cpu, with ctrl a link to it, say */
                    q = tightest_quota("/sys/fs/cgroup/cpu", dir, 1);
            }
        }
        best = tighter(best, q);
    }
    return best;
}
#endif

long hr_usable_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        n = tighter(n, CPU_COUNT(&set));
    n = tighter(n, cgroup_cpus());
#endif
    return n;
}

int hr_runnable_fit(const char *loadavg, long cores)
{
    /* "0.28 0.54 0.61 1/76 22393": the fourth field is runnable/total */
    const char *p = loadavg;
    for (int f = 0; f < 3 && p; f++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    if (!p)
        return -1;
    char *end;
    long running = strtol(p, &end, 10);
    /* The reader itself runs: 0 is a made-up count (gVisor says "0/0"). */
    if (end == p || *end != '/' || running <= 0 || cores <= 0)
        return -1;
    return running <= cores;
}

/* How long one reading of the load stands.  Reading /proc/loadavg is three
 * system calls, and every one-by-one submit waited twice (the producer for
 * its commit, the writer for the next submit): about 7% of the writer's
 * time.  The count moves as processes start and stop, so a reading a few
 * milliseconds old still tells. */
#define LOAD_READING_US 2000

/* hr_runnable_fit of /proc/loadavg now. */
static int read_load(void)
{
#ifdef __linux__
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[128];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return hr_runnable_fit(buf, ncpu);  /* -1 where it cannot tell */
#else
    return -1;
#endif
}

/* hr_runnable_fit of this machine now: 1 or 0, or -1 where it cannot
 * tell (no /proc/loadavg: not Linux, or no /proc). */
static int cores_to_spare(void)
{
    static int64_t read_at = 0;  /* never read: the monotonic clock is long past 0 */
    static int reading = -1;
    int64_t now = hr_mono_us();
    /* Threads may race here: each then reads the file itself, no harm done. */
    if (now - __atomic_load_n(&read_at, __ATOMIC_ACQUIRE) < LOAD_READING_US)
        return __atomic_load_n(&reading, __ATOMIC_RELAXED);
    int fit = read_load();
    __atomic_store_n(&reading, fit, __ATOMIC_RELAXED);
    __atomic_store_n(&read_at, now, __ATOMIC_RELEASE);
    return fit;
}

int hr_spin_slots(int ev)
{
    if (spin_slots < 0) {
        /* The CPUs this process may use: a container's quota or an affinity
         * mask leaves fewer than the machine has, and a spin there burns
         * the quota the process being waited for needs. */
        ncpu = hr_usable_cpus();
        long n = ncpu - 1;
        spin_slots = n < 0 ? 0 : n > HR_SPIN_TOKENS ? HR_SPIN_TOKENS : (int)n;
    }
    int others = spin_slots > 0 ? spin_slots - 1 : 0;
    if (spin_slots == 0 || (ev != HR_EV_WRITER && ev != HR_EV_COMMIT))
        return others;
    /* Where the runnable processes fit the cores, a producer waiting for its
     * commit takes the writer's share too (the writer works on the other
     * core; one-by-one submits: 13.8k -> 18.3k/s).  Where they do not, the
     * writer does not spin either: its spin took the core a woken worker
     * waited for (end to end, the writer's CPU per task 145 -> 75 us).
     * Where the load is unknown, only the writer spins. */
    int fit = cores_to_spare();
    if (fit > 0)
        return spin_slots;
    return ev == HR_EV_WRITER && fit < 0 ? spin_slots : others;
}

/* A free spin token, claimed until `until`; -1 if all are taken.  A token
 * whose time has passed is free, so a spinner killed mid-spin costs
 * nothing once its time is up. */
static int take_spin_token(hr_header *h, int ev, int64_t now, int64_t until)
{
    int n = hr_spin_slots(ev);
    for (int i = 0; i < n; i++) {
        int64_t t = __atomic_load_n(&h->spin_tokens[i], __ATOMIC_RELAXED);
        if (t <= now && __atomic_compare_exchange_n(&h->spin_tokens[i], &t, until, 0, __ATOMIC_ACQ_REL,
                                                    __ATOMIC_RELAXED))
            return i;
    }
    return -1;
}

/* Free a claim that still holds our time (one that lapsed may be another's now). */
static void give_until(int64_t *claim, int64_t until)
{
    __atomic_compare_exchange_n(claim, &until, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
}

static inline hr_event *event(void *mem, int ev) { return &((hr_header *)mem)->events[ev]; }

int64_t hr_mono_us(void)
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

void hr_notify_n(void *mem, int ev, uint32_t n)
{
    if (ev < 0 || ev >= HR_NEVENTS || n == 0)
        return;
    hr_event *e = event(mem, ev);
    __atomic_add_fetch(&e->value, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&e->waiters, __ATOMIC_SEQ_CST) == 0)
        return;
#ifdef __linux__
    syscall(SYS_futex, &e->value, FUTEX_WAKE, n > INT_MAX ? INT_MAX : (int)n, NULL, NULL, 0);
#endif
}

void hr_notify(void *mem, int ev) { hr_notify_n(mem, ev, UINT32_MAX); }

int hr_wait(void *mem, int ev, uint32_t seen, int64_t timeout_us)
{
    if (ev < 0 || ev >= HR_NEVENTS)
        return HR_E_INVALID;
    hr_event *e = event(mem, ev);
    int64_t start = hr_mono_us();
    int64_t deadline = timeout_us < 0 ? INT64_MAX : start + timeout_us;
    int64_t spin_end = start + wait_spin_us;
    /* Spin only as the event's one waiter: where others wait too (4
     * producers sharing commits), the event comes for all of them at once
     * and their spinning would only slow the process they wait for. */
    int token = -1;
    int64_t su = __atomic_load_n(&e->spin_until, __ATOMIC_RELAXED);
    if (wait_spin_us && su <= start && __atomic_load_n(&e->waiters, __ATOMIC_RELAXED) == 0 &&
        __atomic_compare_exchange_n(&e->spin_until, &su, spin_end, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        token = take_spin_token((hr_header *)mem, ev, start, spin_end);
        if (token < 0)
            give_until(&e->spin_until, spin_end);
    }
    if (token >= 0) {
        int got = 0;
        for (int64_t t = start; !got && t < spin_end && t < deadline; t = hr_mono_us()) {
            for (int k = 0; k < 64; k++) {
                if (__atomic_load_n(&e->value, __ATOMIC_ACQUIRE) != seen) {
                    got = 1;
                    break;
                }
                hr_cpu_relax();
            }
        }
        give_until(&((hr_header *)mem)->spin_tokens[token], spin_end);
        give_until(&e->spin_until, spin_end);
        if (got)
            return HR_OK;
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
        int64_t t = hr_mono_us();
        if (t >= deadline)
            break;
        int64_t left = deadline - t;
#ifdef __linux__
        struct timespec ts = {.tv_sec = left / 1000000, .tv_nsec = (left % 1000000) * 1000};
        /* Shared (not PRIVATE) futex: the waker is another process.  A
         * signal ends the wait, so that a Python handler (Ctrl-C) runs now,
         * not when the event or the timeout comes. */
        if (syscall(SYS_futex, &e->value, FUTEX_WAIT, seen, &ts, NULL, 0) < 0 && errno == EINTR) {
            rc = HR_E_INTERRUPTED;
            break;
        }
#else
        if (nap > left)
            nap = left;
        struct timespec ts = {.tv_sec = nap / 1000000, .tv_nsec = (nap % 1000000) * 1000};
        if (nanosleep(&ts, NULL) < 0 && errno == EINTR) {
            rc = HR_E_INTERRUPTED;
            break;
        }
        if (nap < 20000)
            nap *= 2;
#endif
    }
    __atomic_sub_fetch(&e->waiters, 1, __ATOMIC_SEQ_CST);
    return rc;
}
