// The local PKI of `ablate certs` / `ablate up` (cli/pki.h) and how the CLI picks its TLS settings
// (ResolveClientSecurity): files 0600 in a 0700 dir, digests only in the scheduler's tokens file, idempotent
// re-runs, re-issue of what is broken, and the local stack's settings used only for that stack's address.
#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli/client.h"
#include "cli/pki.h"
#include "tests/temp_dir.h"

namespace ablate::cli {
namespace {

namespace fs = std::filesystem;

std::string Read(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool Has(const std::vector<std::string>& v, const std::string& x) { return std::find(v.begin(), v.end(), x) != v.end(); }

X509* LoadCert(const std::string& p) {
  FILE* f = std::fopen(p.c_str(), "r");
  if (!f) return nullptr;
  X509* x = PEM_read_X509(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  return x;
}

class PkiTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"ablate-pki-test"};
  void SetUp() override {
    root_ = tmp_.path();
    dir_ = root_ + "/pki";
  }
  std::string root_, dir_;
};

TEST_F(PkiTest, MakesEverythingPrivateAndSignedByItsCa) {
  PkiOptions o;
  o.workers = {"w-1", "w.2"};
  o.scheduler_names = {"sched.example", "10.1.2.3"};
  PkiReport rep;
  std::string err;
  ASSERT_TRUE(EnsurePki(dir_, o, &rep, &err)) << err;
  EXPECT_TRUE(rep.kept.empty());
  struct stat st {};
  ASSERT_EQ(::stat(dir_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) {
    ++files;
    ASSERT_EQ(::stat(e.path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << e.path();
  }
  // ca, scheduler, 2 workers (cert + key each), user/admin/2 worker tokens, tokens, token-signing.key.
  EXPECT_EQ(files, 2 + 2 + 4 + 4 + 1 + 1);
  X509* ca = LoadCert(dir_ + "/ca.pem");
  ASSERT_NE(ca, nullptr);
  for (const char* leaf : {"scheduler", "w-1", "w.2"}) {
    X509* x = LoadCert(dir_ + "/" + leaf + ".pem");
    ASSERT_NE(x, nullptr) << leaf;
    EXPECT_EQ(X509_verify(x, X509_get0_pubkey(ca)), 1) << leaf;
    X509_free(x);
  }
  X509* sched = LoadCert(dir_ + "/scheduler.pem");
  EXPECT_EQ(X509_check_host(sched, "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_host(sched, "sched.example", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(sched, "127.0.0.1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(sched, "10.1.2.3", 0), 1);
  X509_free(sched);
  X509_free(ca);
  // The scheduler's tokens file holds digests, never the tokens; one line per role/name.
  const std::string tokens = Read(dir_ + "/tokens");
  for (const char* t : {"user", "admin", "w-1", "w.2"}) {
    std::string tok = Read(dir_ + "/" + t + ".token");
    tok.pop_back();
    EXPECT_EQ(tok.size(), 64u);
    EXPECT_EQ(tokens.find(tok), std::string::npos) << t;
  }
  EXPECT_NE(tokens.find("worker w-1 sha256:"), std::string::npos);
  EXPECT_NE(tokens.find("user local-user sha256:"), std::string::npos);
  EXPECT_NE(tokens.find("admin local-admin sha256:"), std::string::npos);
}

TEST_F(PkiTest, ReRunKeepsWhatIsGoodAndReissuesWhatIsNot) {
  PkiOptions o;
  o.workers = {"wa"};
  PkiReport r1, r2, r3, r4;
  std::string err;
  ASSERT_TRUE(EnsurePki(dir_, o, &r1, &err)) << err;
  const std::string ca = Read(dir_ + "/ca.pem"), tok = Read(dir_ + "/wa.token"), wa = Read(dir_ + "/wa.pem");
  ASSERT_TRUE(EnsurePki(dir_, o, &r2, &err)) << err;
  EXPECT_TRUE(r2.made.empty());
  EXPECT_EQ(Read(dir_ + "/ca.pem"), ca);
  EXPECT_EQ(Read(dir_ + "/wa.token"), tok);
  // A new worker: only its files are made; the tokens file gains its line and keeps the older ones.
  o.workers = {"wb"};
  ASSERT_TRUE(EnsurePki(dir_, o, &r3, &err)) << err;
  EXPECT_TRUE(Has(r3.made, "wb.pem") && Has(r3.made, "wb.token") && Has(r3.made, "tokens"));
  EXPECT_FALSE(Has(r3.made, "ca.pem"));
  EXPECT_NE(Read(dir_ + "/tokens").find("worker wa "), std::string::npos);
  // A key that no longer matches its certificate, and a garbage token, are made again.
  fs::copy_file(dir_ + "/scheduler-key.pem", dir_ + "/wa-key.pem", fs::copy_options::overwrite_existing);
  std::ofstream(dir_ + "/wb.token") << "x\n";
  ASSERT_TRUE(EnsurePki(dir_, o, &r4, &err)) << err;
  EXPECT_TRUE(Has(r4.made, "wb.token"));
  o.workers = {"wa"};
  PkiReport r5;
  ASSERT_TRUE(EnsurePki(dir_, o, &r5, &err)) << err;
  EXPECT_TRUE(Has(r5.made, "wa.pem"));
  EXPECT_NE(Read(dir_ + "/wa.pem"), wa);
  // A new CA re-issues every leaf it is asked for.
  fs::remove(dir_ + "/ca-key.pem");
  PkiReport r6;
  ASSERT_TRUE(EnsurePki(dir_, o, &r6, &err)) << err;
  EXPECT_TRUE(Has(r6.made, "ca.pem") && Has(r6.made, "scheduler.pem") && Has(r6.made, "wa.pem"));
}

TEST_F(PkiTest, WorkerIdsThatCannotBeFilesOrCommonNamesAreRefused) {
  std::string why;
  for (const char* bad : {"", "user", "admin", "ca", "scheduler", "tokens", "../x", "a b", "-x", "a/b", "a'b"})
    EXPECT_FALSE(ValidPkiWorkerId(bad, &why)) << bad;
  EXPECT_TRUE(ValidPkiWorkerId("host-7.w_0", &why)) << why;
  PkiOptions o;
  o.workers = {"ok", "../../etc/x"};
  PkiReport rep;
  std::string err;
  EXPECT_FALSE(EnsurePki(dir_, o, &rep, &err));
  EXPECT_FALSE(fs::exists(dir_ + "/ok.pem"));  // refused before anything is written
  o.workers = {"ok"};
  o.scheduler_names = {"a,IP:1.2.3.4"};  // no injection into the SAN list
  EXPECT_FALSE(EnsurePki(dir_, o, &rep, &err));
}

TEST_F(PkiTest, ClientUsesTheLocalStacksTlsOnlyForItsAddress) {
  unsetenv("ABLATE_CA");
  unsetenv("ABLATE_TOKEN");
  unsetenv("ABLATE_TOKEN_FILE");
  unsetenv("ABLATE_TLS_SERVER_NAME");
  fs::create_directories(root_);
  std::ofstream(root_ + "/user.token") << "tok-of-the-local-stack-0123\n";
  std::ofstream(root_ + "/stack.json") << R"({"scheduler":"127.0.0.1:4242","tls":{"ca":")" << root_
                                       << R"(/ca.pem","server_name":"localhost","token_file":")" << root_
                                       << R"(/user.token"}})";
  ClientSecurity s = ResolveClientSecurity("127.0.0.1:4242", root_);
  EXPECT_TRUE(s.tls());
  EXPECT_EQ(s.ca_file, root_ + "/ca.pem");
  EXPECT_EQ(s.server_name, "localhost");
  EXPECT_EQ(s.token, "tok-of-the-local-stack-0123");
  EXPECT_FALSE(ResolveClientSecurity("10.0.0.9:50051", root_).tls());  // another scheduler: not its CA or token
  setenv("ABLATE_TOKEN", "admin-token-from-env-0123", 1);
  EXPECT_EQ(ResolveClientSecurity("127.0.0.1:4242", root_).token, "admin-token-from-env-0123");
  setenv("ABLATE_CA", "/elsewhere/ca.pem", 1);
  s = ResolveClientSecurity("127.0.0.1:4242", root_);
  EXPECT_EQ(s.ca_file, "/elsewhere/ca.pem");
  EXPECT_EQ(s.source, "environment");
  unsetenv("ABLATE_CA");
  unsetenv("ABLATE_TOKEN");
  std::ofstream(root_ + "/stack.json") << R"({"scheduler":"127.0.0.1:4242","tls":null})";  // ablate up --insecure
  EXPECT_FALSE(ResolveClientSecurity("127.0.0.1:4242", root_).tls());
  fs::remove(root_ + "/user.token");
  std::ofstream(root_ + "/stack.json") << R"({"scheduler":"127.0.0.1:4242","tls":{"ca":"c","token_file":")"
                                       << root_ << R"(/user.token"}})";
  s = ResolveClientSecurity("127.0.0.1:4242", root_);
  EXPECT_TRUE(s.token.empty());
  EXPECT_NE(s.warning.find("token file"), std::string::npos);
}

}  // namespace
}  // namespace ablate::cli
