/* The glibc oracle's dlopen driver: a main program linked against libc only.
 *
 * usage: dlopen_driver OUT PATH now|lazy local|global
 * dlopen(PATH, RTLD_NOW or RTLD_LAZY | RTLD_LOCAL or RTLD_GLOBAL), then writes the image to OUT
 * (format: dump.c) and exits with _exit (no fini runs). Exit status 2: bad usage,
 * 3: dlopen failed (dlerror on stderr), 4: the dump failed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

uint64_t oracle_count_objects(void);
int oracle_dump(const char *path, uint64_t startup_count);

static void say(const char *text)
{
    if (write(2, text, strlen(text)) < 0)
        _exit(5);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        say("usage: dlopen_driver OUT PATH now|lazy local|global\n");
        _exit(2);
    }
    int mode = strcmp(argv[3], "now") == 0 ? RTLD_NOW : RTLD_LAZY;
    mode |= strcmp(argv[4], "global") == 0 ? RTLD_GLOBAL : RTLD_LOCAL;
    uint64_t startup = oracle_count_objects();
    if (dlopen(argv[2], mode) == NULL) {
        say(dlerror());
        say("\n");
        _exit(3);
    }
    _exit(oracle_dump(argv[1], startup) ? 4 : 0);
}
