#include <signal.h>
#include <unistd.h>
#include "headrace.h"

int hr_fault_mode = 0;
static int armed_site = -1;
static uint32_t armed_hit = 0;
static uint64_t hits[HR_NFAULTS];

void hr_fault_arm(int site, uint32_t on_hit)
{
    armed_site = site;
    armed_hit = on_hit;
    hr_fault_mode = (site >= 0 && site < HR_NFAULTS) ? 2 : (hr_fault_mode ? 1 : 0);
}

void hr_fault_count(int on)
{
    if (hr_fault_mode != 2)
        hr_fault_mode = on ? 1 : 0;
}

uint64_t hr_fault_hits(int site)
{
    return (site >= 0 && site < HR_NFAULTS) ? hits[site] : 0;
}

void hr_fault_hit(int site)
{
    hits[site]++;
    if (hr_fault_mode == 2 && site == armed_site && hits[site] >= armed_hit)
        kill(getpid(), SIGKILL);
}
