/* The glibc oracle's init/fini driver: a main program linked against libc only.
 *
 * usage: initfini_driver PATH
 * dlopen(PATH, RTLD_NOW | RTLD_LOCAL), then dlclose it, then _exit(0) (no other fini runs).
 * The objects' init/fini functions write the log themselves (initlib.c).
 * Exit status 2: bad usage, 3: dlopen failed, 4: dlclose failed (dlerror on stderr).
 */
#include <dlfcn.h>
#include <string.h>
#include <unistd.h>

static void say(const char *text)
{
    if (write(2, text, strlen(text)) < 0)
        _exit(5);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        say("usage: initfini_driver PATH\n");
        _exit(2);
    }
    void *handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        say(dlerror());
        say("\n");
        _exit(3);
    }
    if (dlclose(handle) != 0) {
        say(dlerror());
        say("\n");
        _exit(4);
    }
    _exit(0);
}
