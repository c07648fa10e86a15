/* Drives docs/fient_clock.h for service/tests/shm.rs.
 *
 *   fient_clock_check now PATH   one reading: "STATUS EARLIEST LATEST"
 *   fient_clock_check open PATH  fient_clock_open's return code
 *   fient_clock_check pure       for each line "AS_OF_MONO AS_OF_REAL LOW HIGH
 *                                PPB STATUS VOID_AFTER LEAP MONO_NOW" on stdin,
 *                                fient_clock_interval_at as "STATUS EARLIEST LATEST"
 */
#include "fient_clock.h"

#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "now") == 0) {
        const struct fient_clock_segment *seg;
        struct fient_clock_interval now;
        int rc = fient_clock_open(argv[2], &seg);
        if (rc == 0)
            rc = fient_clock_now(seg, &now);
        if (rc != 0) {
            fprintf(stderr, "fient_clock_check: error %d on '%s'\n", rc, argv[2]);
            return 1;
        }
        printf("%u %lld %lld\n", now.status, (long long)now.earliest_ns, (long long)now.latest_ns);
        fient_clock_close(seg);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "open") == 0) {
        const struct fient_clock_segment *seg;
        int rc = fient_clock_open(argv[2], &seg);
        printf("%d\n", rc);
        if (rc == 0)
            fient_clock_close(seg);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "pure") == 0) {
        struct fient_clock_snapshot s;
        long long mono, real, low, high, void_after, now;
        unsigned ppb, status, leap;
        memset(&s, 0, sizeof s);
        while (scanf("%lld %lld %lld %lld %u %u %lld %u %lld", &mono, &real, &low, &high, &ppb,
                     &status, &void_after, &leap, &now) == 9) {
            struct fient_clock_interval out;
            s.as_of_mono = mono;
            s.as_of_real = real;
            s.offset_low_ns = low;
            s.offset_high_ns = high;
            s.max_drift_ppb = ppb;
            s.status = status;
            s.void_after_mono = void_after;
            s.leap = leap;
            fient_clock_interval_at(&s, now, &out);
            printf("%u %lld %lld\n", out.status, (long long)out.earliest_ns, (long long)out.latest_ns);
        }
        return 0;
    }
    fprintf(stderr, "usage: fient_clock_check now PATH | open PATH | pure\n");
    return 2;
}
