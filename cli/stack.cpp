// `ablate up` / `ablate down`: a local all-in-one stack (private PostgreSQL, scheduler, workers) in a state dir.
#include <fcntl.h>
#include <glob.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "cli/client.h"
#include "cli/commands.h"
#include "cli/pki.h"

namespace ablate::cli {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string Abs(const std::string& p) { return fs::absolute(p).lexically_normal().string(); }

std::string PgBinDir() {
  glob_t g{};
  std::string best;
  if (::glob("/usr/lib/postgresql/*/bin/initdb", 0, nullptr, &g) == 0) {
    std::vector<std::string> found(g.gl_pathv, g.gl_pathv + g.gl_pathc);
    // Highest major version: compare the number after /postgresql/.
    std::sort(found.begin(), found.end(), [](const std::string& a, const std::string& b) {
      auto ver = [](const std::string& s) { return std::atoi(s.c_str() + s.find("postgresql/") + 11); };
      return ver(a) < ver(b);
    });
    best = fs::path(found.back()).parent_path().string();
  }
  globfree(&g);
  return best;
}

// Runs argv to completion, output appended to log_path. Returns the exit code (-1: could not run).
int RunLogged(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log < 0) return -1;
  pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int null_fd = ::open("/dev/null", O_RDONLY);
    ::dup2(null_fd, 0);
    ::dup2(log, 1);
    ::dup2(log, 2);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "cannot execute %s\n", args[0]);
    ::_exit(127);
  }
  ::close(log);
  int ws = 0;
  while (::waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
}

// Starts argv as a daemon: own session (setsid), stdin /dev/null, stdout/stderr to files. Returns the pid.
pid_t StartDaemon(const std::vector<std::string>& argv, const std::string& out_path, const std::string& err_path) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  int err = err_path == out_path ? out : ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (out < 0 || err < 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setsid();  // no controlling terminal: closing the shell does not SIGHUP the stack
    int null_fd = ::open("/dev/null", O_RDONLY);
    ::dup2(null_fd, 0);
    ::dup2(out, 1);
    ::dup2(err, 2);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "cannot execute %s\n", args[0]);
    ::_exit(127);
  }
  ::close(out);
  if (err != out) ::close(err);
  return pid;
}

// Alive and really the program we started (pids are reused): checks /proc/<pid>/cmdline.
bool IsAlive(pid_t pid, const std::string& name) {
  if (pid <= 0) return false;
  // Our own child: waitpid knows (and /proc cmdline may still show ours between fork and exec).
  int ws;
  pid_t r = ::waitpid(pid, &ws, WNOHANG);
  if (r == pid) return false;
  if (r == 0) return true;
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
  std::string cmd((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (cmd.empty()) return false;
  std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(st)), std::istreambuf_iterator<char>());
  auto rp = stat.rfind(')');
  if (rp != std::string::npos && rp + 2 < stat.size() && stat[rp + 2] == 'Z') return false;
  return cmd.find(name) != std::string::npos;
}

// SIGTERM, wait up to grace, SIGKILL. Returns true when it had to kill.
bool StopProcess(pid_t pid, const std::string& name, std::chrono::milliseconds grace) {
  if (!IsAlive(pid, name)) return false;
  ::kill(pid, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!IsAlive(pid, name)) return false;
    std::this_thread::sleep_for(100ms);
  }
  ::kill(pid, SIGKILL);
  for (int i = 0; i < 50 && IsAlive(pid, name); ++i) std::this_thread::sleep_for(100ms);
  return true;
}

std::string Tail(const std::string& path, size_t lines = 15) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) out += "  | " + all[i] + "\n";
  return out;
}

// PostgreSQL refuses to run as root: as root, run its tools as the unprivileged 'postgres' user.
struct PgRunner {
  std::string bin, dir, log;
  bool as_root = ::geteuid() == 0;
  std::string user = std::getenv("ABLATE_PG_USER") ? std::getenv("ABLATE_PG_USER") : "postgres";

  bool Prepare(std::string* error) {
    if (!as_root) return true;
    struct passwd* pw = ::getpwnam(user.c_str());
    if (!pw) {
      *error = "running as root, and PostgreSQL needs an unprivileged user, but user '" + user +
               "' does not exist (set ABLATE_PG_USER or run scripts/setup-deps.sh)";
      return false;
    }
    for (const auto& e : fs::recursive_directory_iterator(dir)) (void)::chown(e.path().c_str(), pw->pw_uid, pw->pw_gid);
    (void)::chown(dir.c_str(), pw->pw_uid, pw->pw_gid);
    return true;
  }
  int Run(std::vector<std::string> argv) {
    if (as_root) argv.insert(argv.begin(), {"runuser", "-u", user, "--"});
    return RunLogged(argv, log);
  }
};

// Where the cluster of <state>/pg really lives. As root, PostgreSQL runs as the unprivileged user, which must be
// able to reach its files: when <state> is out of its reach (a checkout under /root, mode 700), the cluster goes
// to a private directory under /tmp and <state>/pg becomes a link to it. Returns the real (resolved) path, which
// is what the PostgreSQL tools must be given.
std::string PgHome(const std::string& state, const std::string& logs) {
  const std::string link = state + "/pg";
  std::error_code ec;
  if (::geteuid() == 0 && !fs::is_symlink(link, ec)) {
    const std::string user = std::getenv("ABLATE_PG_USER") ? std::getenv("ABLATE_PG_USER") : "postgres";
    if (RunLogged({"runuser", "-u", user, "--", "test", "-x", state}, logs + "/pg-reach.log") != 0) {
      std::ostringstream name;
      name << "/tmp/ablate-pg-" << std::hex << std::hash<std::string>{}(state);
      fs::create_directories(name.str(), ec);
      ::chmod(name.str().c_str(), 0700);
      if (!fs::exists(link + "/data/PG_VERSION", ec)) fs::remove_all(link, ec);  // never a usable cluster
      if (!fs::exists(link, ec)) fs::create_directory_symlink(name.str(), link, ec);
    }
  }
  const fs::path real = fs::weakly_canonical(link, ec);
  return ec ? link : real.string();
}

constexpr int kPgPort = 5432;  // only names the socket file inside our own socket dir; no TCP

std::string Dsn(const std::string& sock) {
  return "host=" + sock + " port=" + std::to_string(kPgPort) + " dbname=ablate user=ablate";
}

nlohmann::json ReadStackJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return nullptr;
  auto j = nlohmann::json::parse(in, nullptr, false);
  return j.is_discarded() ? nlohmann::json(nullptr) : j;
}

void StopRecorded(const nlohmann::json& st) {
  if (st.contains("worker_pids"))
    for (const auto& p : st["worker_pids"])
      if (p.is_number_integer() && StopProcess(p.get<pid_t>(), "ablate-worker", 15s))
        std::cout << "worker " << p << " did not stop in time: killed\n";
  if (st.contains("scheduler_pid") && st["scheduler_pid"].is_number_integer() &&
      StopProcess(st["scheduler_pid"].get<pid_t>(), "ablate-scheduler", 10s))
    std::cout << "scheduler did not stop in time: killed\n";
}

// How `ablate up` itself reaches the stack it started: the "tls" object of its stack.json (no token needed for the
// health check). Plaintext for a stack started with --insecure or by an older `ablate up`.
ClientSecurity StackSecurity(const nlohmann::json& st) {
  ClientSecurity s;
  if (st.is_object() && st.contains("tls") && st["tls"].is_object()) {
    s.ca_file = st["tls"].value("ca", "");
    s.server_name = st["tls"].value("server_name", "");
  }
  return s;
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ", ") + x;
  return out;
}

int Fail(const std::string& msg) {
  std::cerr << "ablate up: " << msg << "\n";
  return 1;
}

}  // namespace

int CmdUp(const UpOptions& o) {
  const std::string state = Abs(o.state_dir);
  const std::string logs = state + "/logs";
  const std::string data_root = Abs(o.data_root);
  const std::string bin_dir = o.bin_dir.empty() ? SelfDir() : o.bin_dir;
  const std::string stack_path = state + "/stack.json";
  std::error_code ec;
  fs::create_directories(logs, ec);
  const std::string pg_dir = PgHome(state, logs), sock = pg_dir + "/socket";
  fs::create_directories(sock, ec);
  if (ec) return Fail("cannot create " + state + ": " + ec.message());

  // Already up? Then there is nothing to do.
  nlohmann::json old = ReadStackJson(stack_path);
  if (old.is_object() && old.contains("scheduler_pid") && old["scheduler_pid"].is_number_integer() &&
      IsAlive(old["scheduler_pid"].get<pid_t>(), "ablate-scheduler")) {
    std::string herr;
    const ClientSecurity old_sec = StackSecurity(old);
    if (CheckHealth(MakeChannel(old.value("scheduler", ""), old_sec), 3s, &herr) == Health::kServing) {
      std::cout << "stack already up: scheduler " << old.value("scheduler", "?") << " (TLS "
                << (old_sec.tls() ? "on" : "off") << "), metrics http://" << old.value("metrics", "?")
                << "/metrics (state in " << state << "; `ablate down` stops it)\n";
      if (old_sec.tls() == o.insecure)
        std::cout << "note: it runs with TLS " << (old_sec.tls() ? "on" : "off") << "; `ablate down` first to start "
                  << "it with TLS " << (o.insecure ? "off" : "on") << "\n";
      return 0;
    }
  }
  if (old.is_object()) {
    std::cout << "found a stale stack.json; stopping what is left of it\n";
    StopRecorded(old);
    fs::remove(stack_path, ec);
  }

  const std::string sched_bin = bin_dir + "/ablate-scheduler", worker_bin = bin_dir + "/ablate-worker",
                    train_bin = bin_dir + "/ablate-train";
  for (const auto& b : {sched_bin, worker_bin})
    if (::access(b.c_str(), X_OK) != 0) return Fail(b + " not found (binaries are looked up next to `ablate`; build them)");

  // 1. PostgreSQL: private cluster, unix socket only, trust auth.
  const std::string pgbin = PgBinDir();
  if (pgbin.empty()) return Fail("PostgreSQL server binaries not found under /usr/lib/postgresql (run scripts/setup-deps.sh)");
  PgRunner pg{pgbin, pg_dir, logs + "/postgres-ctl.log"};
  std::string err;
  if (!pg.Prepare(&err)) return Fail(err);
  const std::string data = pg_dir + "/data";
  if (!fs::exists(data + "/PG_VERSION")) {
    std::cout << "initializing PostgreSQL cluster in " << data << "\n";
    if (pg.Run({pgbin + "/initdb", "-D", data, "-U", "ablate", "--auth=trust", "-E", "UTF8", "--no-locale"}) != 0)
      return Fail("initdb failed:\n" + Tail(pg.log));
  }
  if (pg.Run({pgbin + "/pg_ctl", "-D", data, "status"}) != 0) {
    std::string opts = "-c listen_addresses='' -c unix_socket_directories='" + sock + "' -p " +
                       std::to_string(kPgPort) + " -c max_connections=200";
    if (pg.Run({pgbin + "/pg_ctl", "-D", data, "-w", "-t", "60", "-l", pg_dir + "/postgres.log", "-o", opts,
                "start"}) != 0)
      return Fail("PostgreSQL did not start:\n" + Tail(pg_dir + "/postgres.log"));
    std::cout << "PostgreSQL started (socket " << sock << ")\n";
  }
  const std::string pg_conn = "host=" + sock + " port=" + std::to_string(kPgPort) + " user=ablate";
  if (RunLogged({pgbin + "/psql", pg_conn + " dbname=ablate", "-Atqc", "select 1"}, logs + "/psql.log") != 0) {
    if (RunLogged({pgbin + "/createdb", "-h", sock, "-p", std::to_string(kPgPort), "-U", "ablate", "ablate"},
                  logs + "/psql.log") != 0)
      return Fail("createdb ablate failed:\n" + Tail(logs + "/psql.log"));
  }
  const std::string dsn = Dsn(sock);

  // 2. Dataset.
  if (!fs::exists(data_root + "/fortunes/meta.json")) {
    if (!fs::exists("/usr/share/games/fortunes"))
      return Fail("the fortunes corpus (/usr/share/games/fortunes) is missing: run scripts/setup-deps.sh");
    if (::access(train_bin.c_str(), X_OK) != 0)
      return Fail(train_bin + " not found: it prepares the dataset and runs the jobs (build with ABLATE_BUILD_ENGINE=ON)");
    std::cout << "preparing dataset " << data_root << "/fortunes\n";
    if (RunLogged({train_bin, "prepare-data", "--input", "/usr/share/games/fortunes", "--output",
                   data_root + "/fortunes"},
                  logs + "/prepare-data.log") != 0)
      return Fail("prepare-data failed:\n" + Tail(logs + "/prepare-data.log"));
  }
  if (::access(train_bin.c_str(), X_OK) != 0)
    std::cerr << "warning: " << train_bin << " not found; workers will fail every job until it is built\n";

  // 3. Schema.
  if (RunLogged({sched_bin, "migrate", "--db", dsn}, logs + "/migrate.log") != 0)
    return Fail("ablate-scheduler migrate failed:\n" + Tail(logs + "/migrate.log"));

  // 4. TLS (unless --insecure): a local CA, the scheduler's certificate, a client certificate per worker, the token
  // signing key and the (legacy) static tokens, made once in <state>/pki and kept (cli/pki.h); workers
  // authenticate with their certificates, the CLI with a short-lived token it mints per call from the signing key
  // (stack.json names the files, never their content). An empty revocation list is made for `ablate token` ids.
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::vector<std::string> worker_ids;
  for (int i = 0; i < o.workers; ++i) worker_ids.push_back(std::string(host) + "-w" + std::to_string(i));
  const std::string pki = state + "/pki";
  ClientSecurity sec;
  nlohmann::json tls_json = nullptr;
  std::vector<std::string> sched_argv = {sched_bin, "serve", "--db", dsn, "--listen", "127.0.0.1:0",
                                         "--metrics_listen", "127.0.0.1:0", "--lease_ttl_s",
                                         std::to_string(o.lease_ttl_s), "--max_attempts", "3"};
  if (!o.insecure) {
    PkiOptions po;
    po.workers = worker_ids;
    PkiReport rep;
    if (!EnsurePki(pki, po, &rep, &err)) return Fail("cannot make the stack's certificates in " + pki + ": " + err);
    if (!rep.made.empty()) std::cout << "TLS: made " << Join(rep.made) << " in " << pki << " (files 0600)\n";
    const std::string revoked = pki + "/revoked-tokens";
    if (::access(revoked.c_str(), F_OK) != 0 &&
        !WritePrivateFile(revoked, "# ids (jti) of revoked tokens, one per line; the scheduler re-reads this file\n",
                          &err))
      return Fail("cannot write " + revoked + ": " + err);
    sched_argv.insert(sched_argv.end(), {"--tls_cert", pki + "/scheduler.pem", "--tls_key", pki + "/scheduler-key.pem",
                                         "--tls_client_ca", pki + "/ca.pem", "--tokens_file", pki + "/tokens",
                                         "--token_signing_key_file", pki + "/token-signing.key",
                                         "--revoked_tokens_file", revoked});
    sec.ca_file = pki + "/ca.pem";
    sec.server_name = "localhost";
    tls_json = {{"ca", sec.ca_file}, {"server_name", sec.server_name}, {"token_file", pki + "/user.token"},
                {"token_signing_key", pki + "/token-signing.key"}, {"revoked_tokens", revoked}, {"pki", pki}};
  }

  // 5. Scheduler on free ports; it prints "listening grpc=ADDR metrics=ADDR" on stdout.
  const std::string sched_out = logs + "/scheduler.out", sched_log = logs + "/scheduler.log";
  pid_t sched = StartDaemon(sched_argv, sched_out, sched_log);
  if (sched < 0) return Fail("cannot start " + sched_bin);
  std::string grpc_addr, metrics_addr;
  static const std::regex re(R"(listening grpc=(\S+) metrics=(\S+))");
  for (auto deadline = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < deadline;) {
    std::ifstream in(sched_out);
    for (std::string line; std::getline(in, line);) {
      std::smatch m;
      if (std::regex_search(line, m, re)) grpc_addr = m[1], metrics_addr = m[2];
    }
    if (!grpc_addr.empty() || !IsAlive(sched, "ablate-scheduler")) break;
    std::this_thread::sleep_for(100ms);
  }
  if (grpc_addr.empty()) {
    StopProcess(sched, "ablate-scheduler", 2s);
    return Fail("the scheduler did not report its ports:\n" + Tail(sched_log) + Tail(sched_out));
  }
  Health h = Health::kUnreachable;
  for (auto deadline = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < deadline;) {
    h = CheckHealth(MakeChannel(grpc_addr, sec), 2s, &err);
    if (h == Health::kServing || !IsAlive(sched, "ablate-scheduler")) break;
    std::this_thread::sleep_for(200ms);
  }
  if (h != Health::kServing) {
    StopProcess(sched, "ablate-scheduler", 2s);
    return Fail("the scheduler at " + grpc_addr + " is not SERVING (" + err + "):\n" + Tail(sched_log));
  }

  // 6. Workers.
  nlohmann::json worker_pids = nlohmann::json::array();
  for (int i = 0; i < o.workers; ++i) {
    std::string wlog = logs + "/worker-" + std::to_string(i) + ".log";
    const std::string& id = worker_ids[i];
    std::vector<std::string> argv = {worker_bin, "--scheduler", grpc_addr, "--worker_id", id, "--train_bin",
                                     train_bin, "--data_root", data_root, "--work_dir", state + "/work"};
    if (sec.tls())
      argv.insert(argv.end(), {"--tls_ca", sec.ca_file, "--tls_cert", pki + "/" + id + ".pem", "--tls_key",
                               pki + "/" + id + "-key.pem", "--tls_server_name", sec.server_name});
    pid_t w = StartDaemon(argv, wlog, wlog);
    if (w < 0) return Fail("cannot start " + worker_bin);
    worker_pids.push_back(w);
  }

  nlohmann::json st = {{"scheduler", grpc_addr},
                       {"metrics", metrics_addr},
                       {"dsn", dsn},
                       {"scheduler_pid", sched},
                       {"worker_pids", worker_pids},
                       {"state_dir", state},
                       {"data_root", data_root},
                       {"bin_dir", bin_dir},
                       {"tls", tls_json},
                       {"started_unix_ms", std::chrono::duration_cast<std::chrono::milliseconds>(
                                               std::chrono::system_clock::now().time_since_epoch())
                                               .count()}};
  {
    std::ofstream out(stack_path + ".tmp");
    out << st.dump(2) << "\n";
  }
  fs::rename(stack_path + ".tmp", stack_path, ec);
  std::this_thread::sleep_for(300ms);
  for (const auto& p : worker_pids)
    if (!IsAlive(p.get<pid_t>(), "ablate-worker"))
      std::cerr << "warning: worker pid " << p << " exited at once; see " << logs << "/worker-*.log\n";
  std::cout << "stack up: scheduler " << grpc_addr << " (pid " << sched << "), metrics http://" << metrics_addr
            << "/metrics, " << o.workers << " worker(s)\n"
            << "  state " << state << ", logs " << logs << ", db " << dsn << "\n";
  if (sec.tls())
    std::cout << "  TLS on: CA and certificates in " << pki << "; workers use client certificates; `ablate` "
              << "commands with --state_dir " << o.state_dir << " use the CA and mint a short-lived user token "
              << "for each call by themselves (signing key " << pki << "/token-signing.key)\n";
  else
    std::cout << "  TLS OFF (--insecure): plaintext, no authentication; anyone who can connect to " << grpc_addr
              << " can submit, cancel and lease jobs\n";
  std::cout << "  next: ablate submit examples/demo-sweep.yaml --wait\n";
  return 0;
}

int CmdDown(const std::string& state_dir) {
  const std::string state = Abs(state_dir);
  const std::string stack_path = state + "/stack.json";
  nlohmann::json st = ReadStackJson(stack_path);
  if (st.is_object()) {
    StopRecorded(st);
    std::cout << "stopped scheduler and workers\n";
  } else {
    std::cout << "no stack.json in " << state << " (no scheduler or workers recorded)\n";
  }
  std::error_code canon_ec;
  const fs::path pg_home = fs::weakly_canonical(state + "/pg", canon_ec);  // resolves the /tmp link of PgHome
  const std::string pg_dir = canon_ec ? state + "/pg" : pg_home.string(), data = pg_dir + "/data";
  if (fs::exists(data + "/PG_VERSION")) {
    const std::string pgbin = PgBinDir();
    PgRunner pg{pgbin, pg_dir, state + "/logs/postgres-ctl.log"};
    std::error_code ec;
    fs::create_directories(state + "/logs", ec);
    if (pg.Run({pgbin + "/pg_ctl", "-D", data, "status"}) == 0) {
      if (pg.Run({pgbin + "/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"}) != 0) {
        std::cerr << "ablate down: pg_ctl stop failed:\n" << Tail(pg.log);
        return 1;
      }
      std::cout << "stopped PostgreSQL (data kept in " << data << ")\n";
    }
  }
  std::error_code ec;
  fs::remove(stack_path, ec);
  return 0;
}

}  // namespace ablate::cli
