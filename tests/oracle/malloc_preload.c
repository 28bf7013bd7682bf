/* A preload library that interposes malloc, free, calloc and realloc, forwarding each to
 * glibc's __libc_* entry points, and counts the mallocs in preload_malloc_calls. */
#include <stddef.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *block);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *block, size_t size);

unsigned long preload_malloc_calls;

void *malloc(size_t size)
{
    preload_malloc_calls++;
    return __libc_malloc(size);
}

void free(void *block)
{
    __libc_free(block);
}

void *calloc(size_t count, size_t size)
{
    return __libc_calloc(count, size);
}

void *realloc(void *block, size_t size)
{
    return __libc_realloc(block, size);
}
