/*
 * cn_test: the smallest test harness. Each unit test program prints one line
 * per failure and ends with "N passed, N failed" (what .ci/run reads).
 *
 *   static void test_x (void) { CHECK (1 + 1 == 2); CHECK_STR (a, "b"); }
 *   int main (void) { RUN (test_x); return cn_test_done (); }
 */
#ifndef CN_TEST_H
#define CN_TEST_H

#include <stdio.h>
#include <string.h>

static int cn_test_passed, cn_test_failed, cn_test_cur_failed;

#define CHECK(cond) do { \
    if (!(cond)) { cn_test_cur_failed++; \
        printf ("  FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); } } while (0)
#define CHECK_STR(a, b) do { const char *a_ = (a), *b_ = (b); \
    if (!a_ || !b_ || strcmp (a_, b_) != 0) { cn_test_cur_failed++; \
        printf ("  FAIL %s:%d: %s == \"%s\", expected \"%s\"\n", __FILE__, __LINE__, \
                #a, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); } } while (0)
#define CHECK_INT(a, b) do { long long a_ = (long long) (a), b_ = (long long) (b); \
    if (a_ != b_) { cn_test_cur_failed++; \
        printf ("  FAIL %s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, \
                #a, a_, b_); } } while (0)
#define RUN(fn) do { cn_test_cur_failed = 0; setvbuf (stdout, NULL, _IOLBF, 0); fn (); \
    if (cn_test_cur_failed) { cn_test_failed++; printf ("not ok %s\n", #fn); } \
    else { cn_test_passed++; printf ("ok %s\n", #fn); } } while (0)

static inline int cn_test_done (void)
{
    printf ("%d passed, %d failed\n", cn_test_passed, cn_test_failed);
    return cn_test_failed ? 1 : 0;
}

#endif
