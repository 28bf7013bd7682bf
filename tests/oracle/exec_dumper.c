/* The glibc oracle's exec-mode dumper: a library to put LAST in LD_PRELOAD.
 *
 * Its constructor writes the image to the file named by $VMSIM_ORACLE_DUMP (format: dump.c),
 * then ends the process with _exit(0): the program's own code never runs. ld.so has finished
 * relocating every startup object before any constructor runs. glibc's sort runs this
 * constructor after those of every other library (and after the program's DT_PREINIT_ARRAY):
 * only the program's own DT_INIT/DT_INIT_ARRAY have not run when it dumps. Built with hidden
 * visibility: it defines no dynamic symbol, so it interposes nothing.
 * Exit status 4: the dump failed; 2: $VMSIM_ORACLE_DUMP unset.
 */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

int oracle_dump(const char *path, uint64_t startup_count);

__attribute__((constructor(101))) static void dump_at_startup(void)
{
    const char *out = getenv("VMSIM_ORACLE_DUMP");
    if (out == NULL)
        _exit(2);
    _exit(oracle_dump(out, UINT64_MAX) ? 4 : 0);
}
