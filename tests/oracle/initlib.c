/* A library (or, with -DPROGRAM, a program) of the init/fini order fixture.
 *
 * Compiled once per object with -DLIB_NAME='"a"' etc. Every init and fini function appends one
 * line "<LIB_NAME>:<which>" to the file named by $VMSIM_ORACLE_INIT_LOG, with write(2);
 * <which> is init_array, fini_array, init (DT_INIT), fini (DT_FINI) or preinit_array.
 * -DWITH_DT_INIT adds oracle_dt_init/oracle_dt_fini, for -Wl,-init=...,-fini=... .
 * -DPROGRAM adds main and a DT_PREINIT_ARRAY entry.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LOG_VARIABLE "VMSIM_ORACLE_INIT_LOG"

static const char *log_path(char **envp)
{
    size_t n = strlen(LOG_VARIABLE);
    for (; envp != NULL && *envp != NULL; envp++)
        if (strncmp(*envp, LOG_VARIABLE, n) == 0 && (*envp)[n] == '=')
            return *envp + n + 1;
    return envp == NULL ? getenv(LOG_VARIABLE) : NULL;
}

/* Append "LIB_NAME:which\n" to the log; envp NULL means read the environment with getenv. */
static void note(const char *which, char **envp)
{
    char line[128];
    const char *path = log_path(envp);
    size_t n = strlen(LIB_NAME), m = strlen(which);
    if (path == NULL || n + m + 2 > sizeof line)
        return;
    memcpy(line, LIB_NAME, n);
    line[n] = ':';
    memcpy(line + n + 1, which, m);
    line[n + m + 1] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0)
        return;
    if (write(fd, line, n + m + 2) < 0)
        _exit(7);
    close(fd);
}

/* glibc calls init functions with (argc, argv, envp). */
static void on_init_array(int argc, char **argv, char **envp)
{
    (void)argc, (void)argv;
    note("init_array", envp);
}

static void on_fini_array(void)
{
    note("fini_array", NULL);
}

__attribute__((used, section(".init_array"))) static void (*init_entry)(int, char **, char **)
    = on_init_array;
__attribute__((used, section(".fini_array"))) static void (*fini_entry)(void) = on_fini_array;

#ifdef WITH_DT_INIT
void oracle_dt_init(int argc, char **argv, char **envp)
{
    (void)argc, (void)argv;
    note("init", envp);
}

void oracle_dt_fini(void)
{
    note("fini", NULL);
}
#endif

#ifdef PROGRAM
static void on_preinit_array(int argc, char **argv, char **envp)
{
    (void)argc, (void)argv;
    note("preinit_array", envp);
}

__attribute__((used, section(".preinit_array")))
static void (*preinit_entry)(int, char **, char **) = on_preinit_array;

int main(void)
{
    return 0;
}
#endif
