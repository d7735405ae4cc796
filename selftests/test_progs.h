/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The selftest runner's interface, after the kernel's test_progs: a test is
 * `void test_<name>(void)` in selftests/prog_tests/<file>.c (the list is generated from those
 * definitions), subtests via test__start_subtest(), and ASSERT_* macros that log, mark the test
 * failed and return a bool so a test writes `if (!ASSERT_OK(err, "attach")) goto cleanup;`.
 * Output is captured per test and shown only on failure or with -v.
 */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Starts a subtest; false when it is filtered out (-t a/b). */
bool test__start_subtest(const char *name);
/*
 * Ends the current subtest before the test's own teardown, so that what the teardown prints (a
 * daemon's log after a failure) is shown as the test's output, not as a passed subtest's.
 */
void test__end_subtest(void);
/* Marks the current (sub)test skipped, with a reason printed on the result line. */
void test__skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void test__fail(void);
/* -v given: tests may print more. */
bool test__verbose(void);
/* Inside a subtest: has it failed? Outside: has anything in the test failed? For cleanups. */
bool test__has_failed(void);

#define _CHECK(condition, tag, format...)                                                      \
	({                                                                                     \
		bool ___ok = !(condition);                                                     \
		if (!___ok) {                                                                  \
			test__fail();                                                          \
			fprintf(stdout, "%s:%d: FAIL %s: ", __func__, __LINE__, tag);          \
			fprintf(stdout, ##format);                                             \
			fputc('\n', stdout);                                                   \
		} else if (test__verbose()) {                                                  \
			fprintf(stdout, "%s:%d: ok %s\n", __func__, __LINE__, tag);            \
		}                                                                              \
		___ok;                                                                         \
	})

#define ASSERT_TRUE(actual, name) _CHECK(!(actual), (name), "unexpected false")
#define ASSERT_FALSE(actual, name) _CHECK((actual), (name), "unexpected true")
#define ASSERT_OK(res, name)                                                                   \
	({                                                                                     \
		long long ___res = (res);                                                      \
		_CHECK(___res != 0, (name), "unexpected error: %lld (errno %d: %s)", ___res,  \
		       errno, strerror(errno));                                                \
	})
#define ASSERT_ERR(res, name)                                                                  \
	({                                                                                     \
		long long ___res = (res);                                                      \
		_CHECK(___res >= 0, (name), "unexpected success: %lld", ___res);               \
	})
#define ASSERT_EQ(actual, expected, name)                                                      \
	({                                                                                     \
		long long ___a = (actual), ___e = (expected);                                  \
		_CHECK(___a != ___e, (name), "actual %lld != expected %lld", ___a, ___e);      \
	})
#define ASSERT_NEQ(actual, expected, name)                                                     \
	({                                                                                     \
		long long ___a = (actual), ___e = (expected);                                  \
		_CHECK(___a == ___e, (name), "actual %lld == expected %lld", ___a, ___e);      \
	})
#define ASSERT_GE(actual, expected, name)                                                      \
	({                                                                                     \
		long long ___a = (actual), ___e = (expected);                                  \
		_CHECK(___a < ___e, (name), "actual %lld < expected %lld", ___a, ___e);        \
	})
#define ASSERT_LE(actual, expected, name)                                                      \
	({                                                                                     \
		long long ___a = (actual), ___e = (expected);                                  \
		_CHECK(___a > ___e, (name), "actual %lld > expected %lld", ___a, ___e);        \
	})
#define ASSERT_LT(actual, expected, name)                                                      \
	({                                                                                     \
		long long ___a = (actual), ___e = (expected);                                  \
		_CHECK(___a >= ___e, (name), "actual %lld >= expected %lld", ___a, ___e);      \
	})
#define ASSERT_GT(actual, expected, name)                                                      \
	({                                                                                     \
		long long ___a = (actual), ___e = (expected);                                  \
		_CHECK(___a <= ___e, (name), "actual %lld <= expected %lld", ___a, ___e);      \
	})
#define ASSERT_STREQ(actual, expected, name)                                                   \
	({                                                                                     \
		const char *___a = (actual), *___e = (expected);                               \
		_CHECK(!___a || !___e || strcmp(___a, ___e), (name),                           \
		       "actual '%s' != expected '%s'", ___a ? ___a : "(null)",                 \
		       ___e ? ___e : "(null)");                                                \
	})
#define ASSERT_HAS_SUBSTR(str, substr, name)                                                   \
	({                                                                                     \
		const char *___s = (str), *___ss = (substr);                                   \
		_CHECK(!___s || !strstr(___s, ___ss), (name), "'%s' not found in '%s'", ___ss, \
		       ___s ? ___s : "(null)");                                                \
	})
#define ASSERT_OK_PTR(ptr, name)                                                               \
	({                                                                                     \
		const void *___p = (ptr);                                                      \
		_CHECK(!___p, (name), "unexpected NULL (errno %d: %s)", errno,                 \
		       strerror(errno));                                                       \
	})
