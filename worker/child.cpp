#include "worker/child.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

#include <cerrno>
#include <cstring>
#include <thread>

namespace ablate::worker {

std::unique_ptr<ChildProcess> ChildProcess::Spawn(const Options& opts, std::string* error) {
  if (opts.argv.empty()) {
    *error = "empty argv";
    return nullptr;
  }
  // Everything the child needs is prepared before fork: after fork in a threaded process only
  // async-signal-safe calls are allowed.
  std::vector<char*> argv;
  for (const auto& a : opts.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  // The environment: ours, with opts.env entries replacing same-named ones; built before fork.
  std::vector<std::string> env_store;
  for (char** e = environ; e && *e; ++e) {
    std::string kv(*e);
    std::string key = kv.substr(0, kv.find('='));
    bool overridden = false;
    for (const auto& o : opts.env) overridden |= o.substr(0, o.find('=')) == key;
    if (!overridden) env_store.push_back(kv);
  }
  for (const auto& o : opts.env) env_store.push_back(o);
  std::vector<char*> envp;
  for (auto& kv : env_store) envp.push_back(kv.data());
  envp.push_back(nullptr);

  int log_fd = ::open(opts.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    *error = "cannot open log " + opts.log_path + ": " + std::strerror(errno);
    return nullptr;
  }
  int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  int events[2], exec_err[2];
  if (::pipe2(events, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    ::close(log_fd);
    if (null_fd >= 0) ::close(null_fd);
    return nullptr;
  }
  if (::pipe2(exec_err, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    ::close(log_fd), ::close(events[0]), ::close(events[1]);
    if (null_fd >= 0) ::close(null_fd);
    return nullptr;
  }
  const int target = opts.events_fd;

  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    *error = std::string("fork: ") + std::strerror(errno);
    for (int fd : {log_fd, events[0], events[1], exec_err[0], exec_err[1]}) ::close(fd);
    if (null_fd >= 0) ::close(null_fd);
    return nullptr;
  }
  if (pid == 0) {
    // Child. Own process group, so a kill reaches anything ablate-train starts.
    ::setpgid(0, 0);
    // If the worker dies (even by SIGKILL) the child must not train on as an orphan: the job's lease will
    // expire and another worker will run it, so a survivor would be a double run. The signal fires when the
    // forking thread exits; Spawn runs on the worker's long-lived job thread. Re-check the parent after
    // arming it, in case the worker died in between.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    // The worker blocks SIGTERM/SIGINT in its threads; exec keeps the mask, so reset it.
    sigset_t all;
    sigemptyset(&all);
    ::sigprocmask(SIG_SETMASK, &all, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    // Move the events write end away from the low fds first so the dup2s below cannot clobber it.
    int ev = ::fcntl(events[1], F_DUPFD_CLOEXEC, 10);
    if (ev < 0 || (null_fd >= 0 && ::dup2(null_fd, 0) < 0) || ::dup2(log_fd, 1) < 0 || ::dup2(log_fd, 2) < 0 ||
        ::dup2(ev, target) < 0) {
      int e = errno;
      (void)!::write(exec_err[1], &e, sizeof e);
      ::_exit(127);
    }
    ::fcntl(target, F_SETFD, 0);  // dup2 cleared CLOEXEC unless ev == target, which F_DUPFD_CLOEXEC >= 10 rules out
    ::execve(argv[0], argv.data(), envp.data());
    int e = errno;
    (void)!::write(exec_err[1], &e, sizeof e);
    ::_exit(127);
  }
  // Parent. Also set the group here: whichever of the two runs first, it is set before anyone signals it.
  ::setpgid(pid, pid);
  ::close(log_fd);
  ::close(events[1]);
  ::close(exec_err[1]);
  if (null_fd >= 0) ::close(null_fd);

  int child_errno = 0;
  ssize_t n;
  do {
    n = ::read(exec_err[0], &child_errno, sizeof child_errno);
  } while (n < 0 && errno == EINTR);
  ::close(exec_err[0]);
  if (n == static_cast<ssize_t>(sizeof child_errno)) {
    int ws;
    while (::waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
    }
    ::close(events[0]);
    *error = "cannot execute " + opts.argv[0] + ": " + std::strerror(child_errno);
    return nullptr;
  }
  std::unique_ptr<ChildProcess> c(new ChildProcess());
  c->pid_ = pid;
  c->events_read_ = events[0];
  return c;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !status_) Stop(std::chrono::milliseconds(2000));
  if (events_read_ >= 0) ::close(events_read_);
}

std::optional<ExitStatus> ChildProcess::TryWait() {
  if (status_) return status_;
  int ws;
  pid_t r = ::waitpid(pid_, &ws, WNOHANG);
  if (r == pid_) status_ = FromWaitStatus(ws);
  return status_;
}

ExitStatus ChildProcess::Wait() {
  while (!status_) {
    int ws;
    pid_t r = ::waitpid(pid_, &ws, 0);
    if (r == pid_) status_ = FromWaitStatus(ws);
    else if (r < 0 && errno != EINTR) status_ = ExitStatus{};  // not our child any more: nothing to wait for
  }
  return *status_;
}

void ChildProcess::SignalGroup(int sig) {
  if (pid_ > 0) ::kill(-pid_, sig);
}

ExitStatus ChildProcess::Stop(std::chrono::milliseconds grace) {
  if (!TryWait()) {
    SignalGroup(SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + grace;
    while (!TryWait() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Also after a clean exit: grandchildren left in the group would hold the events pipe open.
  SignalGroup(SIGKILL);
  return Wait();
}

}  // namespace ablate::worker
