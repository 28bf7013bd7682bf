/* A C library with a 64-byte-aligned __thread variable of nonzero initial value, for
   tests/test_host_tls.py (built with the gnu and the gnu2 TLS dialects). */
__thread long value __attribute__((aligned(64))) = 0x1234567;
__thread char zeros[100];

long *value_address(void) { return &value; }
long bump_value(void) { return ++value; }
int zeros_sum(void) { int s = 0; for (int i = 0; i < 100; i++) s += zeros[i]; zeros[7]++; return s; }
