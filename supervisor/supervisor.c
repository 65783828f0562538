/* workspace-supervisor: runs one command in a workspace container for session-proxy.
 *
 * The proxy execs this program with a constant argv and sends everything else over stdin: the
 * header (header.h), exactly STDIN bytes for the command, then control requests. One poll loop
 * waits on SIGCHLD (a signalfd), stdin and a timerfd; nothing else runs beside it.
 *
 * The command starts in a session of its own, with the header's workdir and its environment
 * entries over the inherited ones, no shell between; its stdout and stderr are ours (the
 * exec's streams, no copy). We are its child subreaper: a descendant that leaves its session
 * (setsid, a double fork) is reparented to us and still ended. Reports are markers,
 * \036SP<NONCE>:<kind>\036, on stderr (the command never sees the nonce):
 *   pgid:<id>            the command started; its process group (and session) id
 *   deadline | gone      we are ending the command ourselves: the backstop passed, or our
 *                        stdin reached EOF (the proxy or its client is gone); said just
 *                        before the exit
 *   exit:<status>        the command ended, 128+N for signal N
 *   left:0 | left:1      whether any descendant was still running at that moment
 *   error:workdir | error:notfound    the command could not be started; nothing ran
 * and \036SP<NONCE>:end:stdout\036 on stdout, after the exit: every byte the command wrote to
 * stdout before it exited comes before it. After these we hold neither output stream, so the
 * exec ends as soon as nothing else holds them.
 *
 * Ends. On a control request "T" after the command's stdin, on stdin EOF (gone) or at the
 * deadline, every descendant gets TERM and CONT, then KILL after GRACE. After a normal exit,
 * what is left is ended the same way one second later (a child on its way to a session of its
 * own still is one of ours), or at once on stdin EOF. We exit once nothing is left.
 * Exit status: 0 after a command ran (its status is in the marker), 90 when stdin ended before
 * the header was complete (an unused warm exec), 91 for a malformed header, 92 for a resource
 * failure before the command started.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "header.h"

#define VERSION_LINE "session-proxy workspace-supervisor " SP_MAGIC "\n"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define LEFTOVER_MOMENT_MS 1000
#define RESCAN_MS 20

extern char **environ;

enum phase {
    RUNNING,  /* the command runs */
    SETTLING, /* it exited on its own; leftovers get a moment before they are ended */
    ENDING,   /* TERM sent; KILL at the timer */
    KILLING,  /* KILL sent; until nothing is left */
};

struct supervisor {
    struct sp_request request;
    pid_t child;
    int child_status; /* -1 until reaped */
    enum phase phase;
    const char *ended_by; /* the marker said before the exit, or NULL */
    int timer;
    int signals;
    int input;        /* our stdin, -1 after EOF */
    int command_in;   /* the command's stdin pipe, -1 once closed */
    uint8_t *stdin_data;
    uint64_t stdin_read, stdin_written;
    int spare_detached; /* the command exited on its own: detached processes may stay */
    struct stat outputs[2]; /* our stdout and stderr as they were: the exec's pipes */
};

static void mark(const struct supervisor *s, int fd, const char *kind) {
    char line[128];
    int length = snprintf(line, sizeof line, "\036SP%s:%s\036", s->request.nonce, kind);
    if (length > 0 && (size_t)length < sizeof line && write(fd, line, (size_t)length) < 0) {
        /* the stream is gone: nothing to tell, the ends go on */
    }
}

static int64_t now_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void arm_timer(int timer, int64_t at_ms) {
    struct itimerspec when = {.it_value = {.tv_sec = at_ms / 1000, .tv_nsec = (at_ms % 1000) * 1000000}};
    if (at_ms <= 0)
        when.it_value.tv_nsec = 1; /* zero would disarm */
    timerfd_settime(timer, TFD_TIMER_ABSTIME, &when, NULL);
}

/* ---- Reading our stdin: exactly N bytes, or EOF. ------------------------------------------ */

static int read_exactly(int fd, uint8_t *buffer, size_t length) {
    size_t done = 0;
    while (done < length) {
        ssize_t got = read(fd, buffer + done, length - done);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        done += (size_t)got;
    }
    return 0;
}

/* ---- Descendants, from /proc: the process tree below us, across sessions. ---------------- */

struct proc_entry {
    pid_t pid, parent;
    char state;
};

/* Every process with its parent and state; NULL when /proc cannot be read. */
static struct proc_entry *list_processes(size_t *count) {
    DIR *proc = opendir("/proc");
    if (proc == NULL)
        return NULL;
    size_t capacity = 256, used = 0;
    struct proc_entry *entries = malloc(capacity * sizeof *entries);
    struct dirent *item;
    while (entries != NULL && (item = readdir(proc)) != NULL) {
        char path[64], text[512];
        pid_t pid = (pid_t)strtol(item->d_name, NULL, 10);
        if (pid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t got = read(fd, text, sizeof text - 1);
        close(fd);
        if (got <= 0)
            continue;
        text[got] = 0;
        /* "PID (COMM) STATE PPID ...": COMM may hold anything, so look from the last ')'. */
        char *after = strrchr(text, ')');
        char state;
        int parent;
        if (after == NULL || sscanf(after + 1, " %c %d", &state, &parent) != 2)
            continue;
        if (used == capacity) {
            struct proc_entry *bigger = realloc(entries, 2 * capacity * sizeof *entries);
            if (bigger == NULL)
                break;
            entries = bigger;
            capacity *= 2;
        }
        entries[used++] = (struct proc_entry){pid, (pid_t)parent, state};
    }
    closedir(proc);
    *count = used;
    return entries;
}

/* Whether PID is detached on purpose, and so may outlive a command that exited on its own: in
 * a session other than the command's, and holding neither of the exec's output pipes. */
static int detached(const struct supervisor *s, pid_t pid) {
    pid_t session = getsid(pid);
    if (session < 0 || session == s->child)
        return 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *fds = opendir(path);
    if (fds == NULL)
        return 0;
    int holds = 0;
    struct dirent *item;
    while (!holds && (item = readdir(fds)) != NULL) {
        struct stat target;
        char link[320];
        snprintf(link, sizeof link, "%s/%s", path, item->d_name);
        if (item->d_name[0] == '.' || stat(link, &target) != 0)
            continue;
        for (int i = 0; i < 2; i++)
            holds |= target.st_dev == s->outputs[i].st_dev && target.st_ino == s->outputs[i].st_ino;
    }
    closedir(fds);
    return !holds;
}

/* Sends SIGNAL to every descendant, whatever its session: the command's group first (the fast,
 * common case), then every process whose chain of parents leads to us, pass after pass (a
 * bitmap of pids marks those found) until a pass finds no new one. Without /proc only the
 * group is reached. */
static int signal_descendants(const struct supervisor *s, int signal) {
    if (s->child_status < 0)
        kill(-s->child, signal);
    int alive = 0;
    size_t count = 0;
    struct proc_entry *entries = list_processes(&count);
    if (entries == NULL) {
        kill(-s->child, signal);
        return kill(-s->child, 0) == 0;
    }
    pid_t self = getpid(), highest = self;
    for (size_t i = 0; i < count; i++)
        if (entries[i].pid > highest)
            highest = entries[i].pid;
    uint8_t *below = calloc((size_t)highest / 8 + 1, 1);
    if (below == NULL) {
        free(entries);
        kill(-s->child, signal);
        return kill(-s->child, 0) == 0;
    }
    below[self / 8] |= (uint8_t)(1u << (self % 8));
    for (int added = 1; added;) {
        added = 0;
        for (size_t i = 0; i < count; i++) {
            pid_t pid = entries[i].pid, parent = entries[i].parent;
            int marked = below[pid / 8] >> (pid % 8) & 1;
            int under = parent > 0 && parent <= highest && (below[parent / 8] >> (parent % 8) & 1);
            if (!marked && under) {
                below[pid / 8] |= (uint8_t)(1u << (pid % 8));
                added = 1;
                if (entries[i].state != 'Z' && !(s->spare_detached && detached(s, pid))) {
                    alive++;
                    kill(pid, signal);
                }
            }
        }
    }
    free(below);
    free(entries);
    return alive;
}

/* Whether any descendant is left: as the subreaper, every descendant whose parent died is our
 * child, so there is one exactly when we have a child (zombies were reaped before). */
static int anything_left(const struct supervisor *s) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0)
        return 0;
    return !s->spare_detached || signal_descendants(s, 0) > 0;
}

/* ---- Ending. -------------------------------------------------------------------------------- */

static void begin_end(struct supervisor *s, const char *reason) {
    if (s->phase == ENDING || s->phase == KILLING)
        return;
    if (s->child_status < 0)
        s->ended_by = reason;
    signal_descendants(s, SIGTERM);
    signal_descendants(s, SIGCONT); /* a stopped process cannot act on TERM */
    s->phase = ENDING;
    arm_timer(s->timer, now_ms() + s->request.grace_ms);
}

static void kill_all(struct supervisor *s) {
    s->phase = KILLING;
    signal_descendants(s, SIGKILL);
}

/* The command is reaped: report, then let go of the output streams. */
static void report_exit(struct supervisor *s) {
    char kind[32];
    int status = s->child_status;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (s->ended_by != NULL)
        mark(s, 2, s->ended_by);
    snprintf(kind, sizeof kind, "exit:%d", code);
    mark(s, 2, kind);
    s->spare_detached = s->phase == RUNNING; /* it exited on its own */
    int left = anything_left(s);
    mark(s, 2, left ? "left:1" : "left:0");
    mark(s, 1, "end:stdout");
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 1);
        dup2(null, 2);
        close(null);
    } else {
        close(1);
        close(2);
    }
    if (left && s->phase == RUNNING) {
        s->phase = SETTLING;
        arm_timer(s->timer, now_ms() + LEFTOVER_MOMENT_MS);
    }
}

/* Reaps every zombie (the command, orphans reparented to us); then reports the command's exit
 * if it was among them, so that "left" counts only what is alive. */
static void reap(struct supervisor *s) {
    int status, reported = s->child_status >= 0;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        if (pid == s->child)
            s->child_status = status;
    if (!reported && s->child_status >= 0)
        report_exit(s);
}

/* ---- The command's stdin: exactly STDIN bytes from ours, then EOF. ------------------------ */

static void close_command_input(struct supervisor *s) {
    if (s->command_in >= 0)
        close(s->command_in);
    s->command_in = -1;
}

static void on_input(struct supervisor *s) {
    uint8_t control[256];
    if (s->stdin_read < s->request.stdin_length) {
        size_t want = (size_t)(s->request.stdin_length - s->stdin_read);
        ssize_t got = read(s->input, s->stdin_data + s->stdin_read, want);
        if (got > 0) {
            s->stdin_read += (uint64_t)got;
            return;
        }
        if (got < 0 && errno == EINTR)
            return;
    } else {
        ssize_t got = read(s->input, control, sizeof control);
        if (got > 0) {
            if (memchr(control, 'T', (size_t)got) != NULL)
                begin_end(s, NULL);
            return;
        }
        if (got < 0 && errno == EINTR)
            return;
    }
    /* EOF (or a broken stdin): the proxy or its client is gone. */
    s->input = -1;
    close_command_input(s);
    begin_end(s, "gone");
}

static void feed_command(struct supervisor *s) {
    ssize_t put = write(s->command_in, s->stdin_data + s->stdin_written, (size_t)(s->stdin_read - s->stdin_written));
    if (put > 0)
        s->stdin_written += (uint64_t)put;
    else if (put < 0 && errno != EAGAIN && errno != EINTR)
        close_command_input(s); /* the command closed its stdin: the rest is not for anyone */
    if (s->stdin_written == s->request.stdin_length)
        close_command_input(s);
}

/* ---- Starting the command. ------------------------------------------------------------------ */

/* The environment: the inherited one with the request's entries put over it. */
static char **command_environment(char **request_env) {
    size_t inherited = 0, extra = 0;
    while (environ[inherited])
        inherited++;
    while (request_env[extra])
        extra++;
    char **merged = calloc(inherited + extra + 1, sizeof *merged);
    if (merged == NULL)
        return NULL;
    size_t used = 0;
    for (size_t i = 0; i < inherited; i++) {
        size_t name = strcspn(environ[i], "=");
        int replaced = 0;
        for (size_t j = 0; j < extra && !replaced; j++)
            replaced = strncmp(request_env[j], environ[i], name + 1) == 0;
        if (!replaced)
            merged[used++] = environ[i];
    }
    for (size_t j = 0; j < extra; j++)
        merged[used++] = request_env[j];
    return merged;
}

static const char *lookup(char **env, const char *name) {
    size_t length = strlen(name);
    for (; *env; env++)
        if (strncmp(*env, name, length) == 0 && (*env)[length] == '=')
            return *env + length + 1;
    return NULL;
}

static void try_exec(const char *path, char **argv, char **env) {
    execve(path, argv, env);
    if (errno == ENOEXEC) { /* a script without #!: as execvp does, through /bin/sh */
        size_t argc = 0;
        while (argv[argc])
            argc++;
        char **shell = calloc(argc + 2, sizeof *shell);
        if (shell != NULL) {
            shell[0] = "sh";
            shell[1] = (char *)path;
            memcpy(shell + 2, argv + 1, argc * sizeof *shell);
            execve("/bin/sh", shell, env);
        }
        errno = ENOEXEC;
    }
}

/* In the child: exec ARGV with the request's PATH; returns the errno that tells why not. */
static int exec_program(char **argv, char **env) {
    const char *program = argv[0];
    if (strchr(program, '/') != NULL) {
        try_exec(program, argv, env);
        return errno;
    }
    const char *search = lookup(env, "PATH");
    if (search == NULL)
        search = DEFAULT_PATH;
    int found_error = ENOENT;
    size_t name = strlen(program);
    char *path = malloc(strlen(search) + name + 2);
    if (path == NULL)
        return ENOMEM;
    while (1) {
        size_t dir = strcspn(search, ":");
        memcpy(path, search, dir);
        size_t at = dir;
        if (dir > 0)
            path[at++] = '/';
        memcpy(path + at, program, name + 1);
        try_exec(path, argv, env);
        if (errno != ENOENT && errno != ENOTDIR)
            found_error = errno; /* found, but not runnable: that is the answer if nothing runs */
        if (search[dir] == 0)
            break;
        search += dir + 1;
    }
    return found_error;
}

/* Forks the command; returns its errno when it could not be started (0: it runs). */
static int start_command(struct supervisor *s, char **env) {
    int report[2], feed[2] = {-1, -1};
    if (pipe2(report, O_CLOEXEC) != 0)
        return -1;
    if (s->request.stdin_length > 0 && pipe2(feed, O_CLOEXEC) != 0)
        return -1;
    s->child = fork();
    if (s->child < 0)
        return -1;
    if (s->child == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        int in = feed[0] >= 0 ? feed[0] : open("/dev/null", O_RDONLY);
        if (in < 0 || dup2(in, 0) < 0)
            _exit(127);
        int error = exec_program(s->request.argv, env);
        if (write(report[1], &error, sizeof error) < 0)
            _exit(127);
        _exit(127);
    }
    close(report[1]);
    if (feed[0] >= 0) {
        close(feed[0]);
        s->command_in = feed[1];
        fcntl(s->command_in, F_SETFL, O_NONBLOCK);
    }
    int error = 0;
    ssize_t got;
    do
        got = read(report[0], &error, sizeof error);
    while (got < 0 && errno == EINTR);
    close(report[0]);
    return got == (ssize_t)sizeof error ? error : 0;
}

/* ---- The loop. ------------------------------------------------------------------------------- */

static void on_timer(struct supervisor *s) {
    uint64_t expirations;
    if (read(s->timer, &expirations, sizeof expirations) < 0)
        return;
    if (s->phase == RUNNING)
        begin_end(s, "deadline");
    else if (s->phase == SETTLING)
        begin_end(s, NULL);
    else if (s->phase == ENDING)
        kill_all(s);
}

static int run(struct supervisor *s) {
    int64_t deadline = now_ms() + s->request.deadline_ms;
    arm_timer(s->timer, deadline);
    while (s->child_status < 0 || anything_left(s)) {
        struct pollfd fds[4] = {
            {.fd = s->signals, .events = POLLIN},
            {.fd = s->timer, .events = POLLIN},
            {.fd = s->input, .events = POLLIN},
            {.fd = s->stdin_written < s->stdin_read ? s->command_in : -1, .events = POLLOUT},
        };
        /* While something is being ended, descendants that are not our children end unseen:
         * look again every RESCAN_MS. */
        int timeout = s->phase == RUNNING ? -1 : RESCAN_MS;
        if (poll(fds, 4, timeout) < 0 && errno != EINTR)
            return 92;
        if (fds[0].revents) {
            struct signalfd_siginfo info;
            if (read(s->signals, &info, sizeof info) < 0) {
                /* nothing: reap below looks anyway */
            }
        }
        reap(s);
        if (fds[1].revents)
            on_timer(s);
        if (fds[2].revents)
            on_input(s);
        if (fds[3].revents && s->command_in >= 0)
            feed_command(s);
        if (s->phase == KILLING)
            signal_descendants(s, SIGKILL); /* forks that raced the last round */
        reap(s);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        return write(1, VERSION_LINE, sizeof VERSION_LINE - 1) == sizeof VERSION_LINE - 1 ? 0 : 1;
    }
    uint8_t prefix[SP_PREFIX_LENGTH];
    if (read_exactly(0, prefix, sizeof prefix))
        return 90;
    long body_length = sp_body_length(prefix);
    if (body_length < 0)
        return 91;
    uint8_t *body = malloc((size_t)body_length + 1);
    if (body == NULL)
        return 92;
    if (read_exactly(0, body, (size_t)body_length))
        return 90;
    struct supervisor s = {.child_status = -1, .phase = RUNNING, .input = 0, .command_in = -1};
    if (sp_parse_body(body, (size_t)body_length, &s.request))
        return 91;
    if (s.request.workdir != NULL && chdir(s.request.workdir) != 0) {
        mark(&s, 2, "error:workdir");
        return 0;
    }
    char **env = command_environment(s.request.env);
    s.stdin_data = s.request.stdin_length ? malloc((size_t)s.request.stdin_length) : NULL;
    sigset_t child_signal;
    sigemptyset(&child_signal);
    sigaddset(&child_signal, SIGCHLD);
    fstat(1, &s.outputs[0]);
    fstat(2, &s.outputs[1]);
    signal(SIGPIPE, SIG_IGN); /* a report the stream cannot take must not stop the rest */
    if (env == NULL || (s.request.stdin_length && s.stdin_data == NULL) ||
        sigprocmask(SIG_BLOCK, &child_signal, NULL) != 0 ||
        (s.signals = signalfd(-1, &child_signal, SFD_CLOEXEC)) < 0 ||
        (s.timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC)) < 0 ||
        prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
        return 92;
    int error = start_command(&s, env);
    if (error < 0)
        return 92;
    if (error > 0) {
        waitpid(s.child, NULL, 0);
        mark(&s, 2, error == ENOENT || error == ENOTDIR ? "error:notfound" : "error:notrunnable");
        return 0;
    }
    char started[32];
    snprintf(started, sizeof started, "pgid:%d", (int)s.child);
    mark(&s, 2, started);
    if (s.request.stdin_length == 0)
        close_command_input(&s);
    return run(&s);
}
