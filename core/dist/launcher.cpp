#include "core/dist/launcher.h"

#include "core/dist/communicator.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <stdexcept>

namespace ablate::dist {
namespace {

std::atomic<int> g_signal{0};
void on_signal(int sig) { g_signal = sig; }

}  // namespace

int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0)
    throw std::runtime_error(std::string("--nproc: cannot find a free port: ") + std::strerror(errno));
  ::close(fd);
  return ntohs(a.sin_port);
}

namespace {

void write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

struct Child {
  pid_t pid = -1;
  int out = -1, err = -1;      // read ends
  std::string out_buf, err_buf;  // partial lines
  bool exited = false;
  int status = 0;
};

// Copies complete lines of `buf` to fd, prefixed; keeps the unfinished tail (all of it at EOF when `flush`).
void emit_lines(std::string& buf, int fd, const std::string& prefix, bool flush) {
  size_t start = 0;
  for (;;) {
    const size_t nl = buf.find('\n', start);
    if (nl == std::string::npos) break;
    write_all(fd, prefix + buf.substr(start, nl - start + 1));
    start = nl + 1;
  }
  buf.erase(0, start);
  if (flush && !buf.empty()) {
    write_all(fd, prefix + buf + "\n");
    buf.clear();
  }
}

}  // namespace

std::vector<std::string> strip_flag(const std::vector<std::string>& args, const std::string& flag) {
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == flag) {
      ++i;  // and its value
      continue;
    }
    if (args[i].rfind(flag + "=", 0) == 0) continue;
    out.push_back(args[i]);
  }
  return out;
}

int launch_local(int nproc, const std::vector<std::string>& args) {
  // One node of several (torchrun's --nnodes/--node_rank): this node's ranks are node_rank * nproc + r of
  // nnodes * nproc, meeting at the MASTER_ADDR:MASTER_PORT the caller set (rank 0's node). One node: 127.0.0.1.
  const int nnodes = std::max(1, env_int("ABLATE_NNODES", 1));
  const int node_rank = env_int("ABLATE_NODE_RANK", 0);
  if (node_rank >= nnodes)
    throw std::runtime_error("--nproc: ABLATE_NODE_RANK " + std::to_string(node_rank) + " is not below ABLATE_NNODES " +
                             std::to_string(nnodes));
  std::string master_addr = "127.0.0.1", master_port;
  if (nnodes > 1) {
    const char* a = std::getenv("MASTER_ADDR");
    const char* p = std::getenv("MASTER_PORT");
    if (!a || !*a || !p || !*p)
      throw std::runtime_error("--nproc with ABLATE_NNODES > 1 needs MASTER_ADDR and MASTER_PORT (rank 0's node)");
    master_addr = a;
    master_port = p;
  } else {
    master_port = std::to_string(free_local_port());
  }
  const int world = nnodes * nproc, first_rank = node_rank * nproc;
  std::vector<Child> kids(static_cast<size_t>(nproc));
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(s, &sa, nullptr);
  const pid_t parent = ::getpid();
  for (int r = 0; r < nproc; ++r) {
    int po[2], pe[2];
    if (::pipe2(po, O_CLOEXEC) != 0 || ::pipe2(pe, O_CLOEXEC) != 0)
      throw std::runtime_error(std::string("--nproc: pipe: ") + std::strerror(errno));
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error(std::string("--nproc: fork: ") + std::strerror(errno));
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the launcher
      if (::getppid() != parent) ::_exit(1);
      ::dup2(po[1], STDOUT_FILENO);
      ::dup2(pe[1], STDERR_FILENO);
      ::setenv("RANK", std::to_string(first_rank + r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", master_addr.c_str(), 1);
      ::setenv("MASTER_PORT", master_port.c_str(), 1);
      std::vector<std::string> argv_s = {"ablate-train"};
      argv_s.insert(argv_s.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& a : argv_s) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      const std::string msg = std::string("ablate-train --nproc: exec failed: ") + std::strerror(errno) + "\n";
      write_all(STDERR_FILENO, msg);
      ::_exit(127);
    }
    ::close(po[1]);
    ::close(pe[1]);
    kids[r].pid = pid;
    kids[r].out = po[0];
    kids[r].err = pe[0];
  }

  // Exit code: rank 0 reports the run (events, finished status), so when it fails its code is the run's. When
  // another rank fails first, rank 0 gets a few seconds to notice (its collective fails) and exit with its own
  // diagnosis before everybody is stopped; otherwise the first failing rank's code is used.
  int first_failure = -1, result = 0, forwarded = 0;
  std::chrono::steady_clock::time_point kill_at{}, stop_at{};
  bool terminating = false, stop_pending = false;
  auto terminate_all = [&](int sig) {
    for (auto& k : kids)
      if (!k.exited) ::kill(k.pid, sig);
  };
  auto start_termination = [&] {
    if (terminating) return;
    terminating = true;
    terminate_all(SIGTERM);
    terminate_all(SIGCONT);  // a stopped rank (SIGSTOP, a debugger) must wake up to act on it
    kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  };
  for (;;) {
    if (const int s = g_signal.load(); s != 0 && s != forwarded) {  // forward each new signal to every rank
      terminate_all(s);
      forwarded = s;
      if (!terminating) {
        terminating = true;
        kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      }
    }
    std::vector<pollfd> fds;
    std::vector<std::pair<size_t, bool>> who;  // (rank, is_err)
    for (size_t r = 0; r < kids.size(); ++r) {
      if (kids[r].out >= 0) {
        fds.push_back({kids[r].out, POLLIN, 0});
        who.emplace_back(r, false);
      }
      if (kids[r].err >= 0) {
        fds.push_back({kids[r].err, POLLIN, 0});
        who.emplace_back(r, true);
      }
    }
    if (!fds.empty()) ::poll(fds.data(), fds.size(), 100);
    for (size_t i = 0; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      auto& k = kids[who[i].first];
      const bool is_err = who[i].second;
      char buf[65536];
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      const int global = first_rank + static_cast<int>(who[i].first);
      const std::string prefix = global == 0 ? "" : "[rank " + std::to_string(global) + "] ";
      std::string& lb = is_err ? k.err_buf : k.out_buf;
      if (n <= 0) {
        emit_lines(lb, is_err ? STDERR_FILENO : STDOUT_FILENO, prefix, true);
        ::close(fds[i].fd);
        (is_err ? k.err : k.out) = -1;
        continue;
      }
      lb.append(buf, static_cast<size_t>(n));
      emit_lines(lb, is_err ? STDERR_FILENO : STDOUT_FILENO, prefix, false);
    }
    bool all_done = true;
    for (size_t r = 0; r < kids.size(); ++r) {
      auto& k = kids[r];
      if (!k.exited) {
        int st = 0;
        if (::waitpid(k.pid, &st, WNOHANG) == k.pid) {
          k.exited = true;
          k.status = st;
          const int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
          if (code != 0 && r == 0 && !terminating) {  // rank 0's own failure: its code wins
            first_failure = 0;
            result = code;
            start_termination();
          } else if (code != 0 && first_failure < 0) {
            first_failure = static_cast<int>(r);
            result = code;
            if (!terminating) {
              write_all(STDERR_FILENO, "ablate-train --nproc: rank " + std::to_string(first_rank + r) + " failed (exit code " +
                                           std::to_string(code) + "); stopping the other ranks\n");
              if (kids[0].exited) {
                start_termination();
              } else {
                stop_pending = true;
                stop_at = std::chrono::steady_clock::now() + std::chrono::seconds(5);
              }
            }
          }
        }
      }
      if (!k.exited || k.out >= 0 || k.err >= 0) all_done = false;
    }
    if (all_done) break;
    if (stop_pending && !terminating && (kids[0].exited || std::chrono::steady_clock::now() > stop_at))
      start_termination();
    if (terminating && std::chrono::steady_clock::now() > kill_at) terminate_all(SIGKILL);
  }
  if (first_failure < 0 && g_signal.load() != 0) result = 128 + g_signal.load();
  return result;
}

}  // namespace ablate::dist
