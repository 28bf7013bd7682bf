/* The glibc oracle's dlopen driver: a main program linked against libc only.
 *
 * usage: dlopen_driver dump OUT PATH now|lazy local|global
 *   dlopen(PATH, RTLD_NOW or RTLD_LAZY | RTLD_LOCAL or RTLD_GLOBAL), write the image to OUT
 *   (format: dump.c), _exit (no fini runs).
 * usage: dlopen_driver initfini PATH
 *   dlopen(PATH, RTLD_NOW | RTLD_LOCAL), dlclose it, _exit (the objects' init and fini
 *   functions write their own log: initlib.c).
 * Exit status 2: bad usage, 3: dlopen failed, 4: the dump failed, 6: dlclose failed
 * (dlerror on stderr).
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

static void fail(int status, const char *why)
{
    say(why);
    say("\n");
    _exit(status);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "initfini") == 0) {
        void *handle = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
        if (handle == NULL)
            fail(3, dlerror());
        if (dlclose(handle) != 0)
            fail(6, dlerror());
        _exit(0);
    }
    if (argc != 6 || strcmp(argv[1], "dump") != 0)
        fail(2, "usage: dlopen_driver dump OUT PATH now|lazy local|global\n"
                "       dlopen_driver initfini PATH");
    int mode = strcmp(argv[4], "now") == 0 ? RTLD_NOW : RTLD_LAZY;
    mode |= strcmp(argv[5], "global") == 0 ? RTLD_GLOBAL : RTLD_LOCAL;
    uint64_t startup = oracle_count_objects();
    if (dlopen(argv[3], mode) == NULL)
        fail(3, dlerror());
    _exit(oracle_dump(argv[2], startup) ? 4 : 0);
}
