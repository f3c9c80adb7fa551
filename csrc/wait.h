/* Wake-ups through u32 event words in the segment.
 *
 * A waiter passes the value it last saw; it returns as soon as the word
 * differs, spinning briefly first, then sleeping on a futex (Linux) or
 * polling with backoff (elsewhere).  A notifier bumps the word and makes a
 * system call only when a waiter is registered, so the hot path stays free
 * of system calls.
 */
#ifndef HR_WAIT_H
#define HR_WAIT_H

#include <stdint.h>

uint32_t hr_event_value(void *mem, int ev);
void hr_notify(void *mem, int ev);
/* hr_notify, waking at most `n` sleepers (0: none, and no bump): for work
 * that `n` claimers can take, so that the others sleep on (on 2 cores, two
 * workers woken for each one-by-one task took turns preempting the producer
 * and the writer). */
void hr_notify_n(void *mem, int ev, uint32_t n);
/* HR_OK once the word differs from `seen`, HR_E_TIMEOUT after `timeout_us`
 * (< 0: none), HR_E_INTERRUPTED if a signal came first. */
int hr_wait(void *mem, int ev, uint32_t seen, int64_t timeout_us);
void hr_set_wait_spin(uint32_t spin_us);
/* How many waiters on `ev` may spin at once, as this process sees it now. */
int hr_spin_slots(int ev);
/* Whether /proc/loadavg text `loadavg` counts at most `cores` runnable
 * tasks: 1 or 0, or -1 where the text does not say (malformed, or no
 * runnable task at all, which cannot be: the reader runs). */
int hr_runnable_fit(const char *loadavg, long cores);
/* CPUs this process may use: the online ones, fewer where its affinity
 * mask or a cgroup CPU quota (v2's cpu.max or v1's cfs quota, rounded up)
 * allows fewer. */
long hr_usable_cpus(void);
/* Whole CPUs (rounded up) that cgroup v2 cpu.max text `cpu_max` allows:
 * 0 for no limit ("max ..."), -1 where the text does not say. */
long hr_quota_cpus(const char *cpu_max);
/* Whole CPUs that cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us texts
 * allow (rounded up): 0 for no limit (-1), -1 where the texts do not say. */
long hr_quota_cpus_v1(const char *quota_us, const char *period_us);
/* Microseconds on the monotonic clock, for waits' deadlines. */
int64_t hr_mono_us(void);

#endif
