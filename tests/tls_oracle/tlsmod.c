/* One TLS module of the oracle (tests/test_tls_layout.py): HEAD initialised bytes aligned to
   ALIGN (.tdata), then TAIL zero bytes (.tbss). Built as a shared library with
   -DNAME=... -DHEAD=... -DTAIL=... -DALIGN=... -DFILL=...; NAME_addr() returns the block's
   first byte (and so allocates it, for a module in dynamic TLS). */

#define PASTE(a, b) a##b
#define ADDR_FN(name) PASTE(name, _addr)

__attribute__((used, aligned(ALIGN)))
static __thread unsigned char head[HEAD] = {[0 ... HEAD - 1] = FILL, [0] = 0xA5};

#if TAIL
__attribute__((used)) static __thread unsigned char tail[TAIL];
#endif

void *ADDR_FN(NAME)(void) { return head; }
