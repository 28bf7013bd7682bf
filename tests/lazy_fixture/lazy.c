/* A library whose functions call through its PLT: built -z lazy by tests/test_lazy_host.py. */
#include <stdio.h>
#include <string.h>

size_t fx_len(const char *s) { return strlen(s); }

/* varargs with a double: %al says how many vector registers carry arguments */
int fx_format(char *buf, size_t n, double d, int i) { return snprintf(buf, n, "%.17g %d", d, i); }

/* Left undefined: the test binds it to mix_impl, so every argument register (and two stack
   arguments) crosses the trampoline. */
extern double fx_mix(long a, long b, long c, long d, long e, long f, long g, double x0,
                     double x1, double x2, double x3, double x4, double x5, double x6,
                     double x7, double x8);

double call_mix(void)
{
    return fx_mix(1, 2, 3, 4, 5, 6, 7, .5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5);
}

double seen[16];     /* what mix_impl received, argument by argument */

double mix_impl(long a, long b, long c, long d, long e, long f, long g, double x0, double x1,
                double x2, double x3, double x4, double x5, double x6, double x7, double x8)
{
    double args[16] = {a, b, c, d, e, f, g, x0, x1, x2, x3, x4, x5, x6, x7, x8};
    memcpy(seen, args, sizeof seen);
    return x8;
}

/* Left undefined too, bound to al_impl: a varargs call sets %al to the number of vector
   registers that carry arguments (here 1); al_impl returns the %al it was called with. */
extern long fx_count(int n, ...);

long call_count(void) { return fx_count(1, 2.0); }

__asm__(".text\n.globl al_impl\n.type al_impl, @function\n"
        "al_impl:\n\tendbr64\n\tmovzbl %al, %eax\n\tret\n.size al_impl, .-al_impl\n");
