// ablate-worker's scheduler credentials: the token file is read strictly and re-read when it changes (a broken
// replacement keeps the previous token), and a token (or a client certificate) never goes over a plaintext
// channel unless --allow_insecure_token says so.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "worker/credentials.h"
#include "tests/temp_dir.h"

namespace ablate::worker {
namespace {

class CredentialsTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"ablate-cred-test"};
  void SetUp() override {
    dir_ = tmp_.path();
  }
  std::string Write(const std::string& name, const std::string& content, mode_t mode = 0600) {
    std::string p = dir_ + "/" + name;
    std::ofstream(p) << content;
    ::chmod(p.c_str(), mode);
    return p;
  }
  // A new file renamed over the old one (what a token refresher should do).
  std::string Replace(const std::string& name, const std::string& content) {
    Write(name + ".tmp", content);
    std::filesystem::rename(dir_ + "/" + name + ".tmp", dir_ + "/" + name);
    return dir_ + "/" + name;
  }
  std::string dir_;
};

TEST_F(CredentialsTest, TokenFileFirstLineTrimmed) {
  std::string tok, warn, err;
  ASSERT_TRUE(ReadTokenFile(Write("t", "  abcdef0123456789abcdef \nsecond line\n"), &tok, &warn, &err)) << err;
  EXPECT_EQ(tok, "abcdef0123456789abcdef");
  EXPECT_TRUE(warn.empty());
}

TEST_F(CredentialsTest, TokenFileRefusalsNeverQuoteTheContent) {
  std::string tok, warn, err;
  EXPECT_FALSE(ReadTokenFile(Write("empty", "\n"), &tok, &warn, &err));
  EXPECT_NE(err.find("empty"), std::string::npos);
  err.clear();
  EXPECT_FALSE(ReadTokenFile(Write("blank", "secret-part1 secret-part2\n"), &tok, &warn, &err));
  EXPECT_EQ(err.find("secret"), std::string::npos) << err;
  err.clear();
  EXPECT_FALSE(ReadTokenFile(Write("big", std::string(5000, 'x')), &tok, &warn, &err));
  err.clear();
  EXPECT_FALSE(ReadTokenFile(dir_ + "/missing", &tok, &warn, &err));
  err.clear();
  EXPECT_FALSE(ReadTokenFile(dir_, &tok, &warn, &err));  // a directory
}

TEST_F(CredentialsTest, WorldReadableTokenFileWarns) {
  std::string tok, warn, err;
  ASSERT_TRUE(ReadTokenFile(Write("t", "abcdef0123456789\n", 0644), &tok, &warn, &err));
  EXPECT_NE(warn.find("chmod 600"), std::string::npos);
}

TEST_F(CredentialsTest, TokenWithoutTlsIsRefusedUnlessAllowed) {
  SchedulerConnection c;
  c.target = "127.0.0.1:1";
  c.token_file = Write("t", "abcdef0123456789\n");
  std::string auth, err;
  EXPECT_EQ(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr);
  EXPECT_NE(err.find("needs TLS"), std::string::npos) << err;
  c.allow_insecure_token = true;
  err.clear();
  EXPECT_NE(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr) << err;
  EXPECT_EQ(auth.rfind("plaintext+token", 0), 0u) << auth;
  EXPECT_EQ(auth.find("abcdef"), std::string::npos);
}

TEST_F(CredentialsTest, TokenFileIsReReadWhenItChanges) {
  const std::string p = Replace("t", "first-token-0123456789\n");
  TokenSource src(p, "first-token-0123456789");
  EXPECT_EQ(src.Get(), "first-token-0123456789");
  EXPECT_EQ(src.reloads(), 0);
  Replace("t", "second-token-0123456789\n");
  EXPECT_EQ(src.Get(), "second-token-0123456789");
  EXPECT_EQ(src.reloads(), 1);
  Replace("t", "bad token with blanks\n");  // refused: the previous token stays
  EXPECT_EQ(src.Get(), "second-token-0123456789");
  std::filesystem::remove(p);  // gone: the previous token stays
  EXPECT_EQ(src.Get(), "second-token-0123456789");
  Replace("t", "third-token-0123456789\n");
  EXPECT_EQ(src.Get(), "third-token-0123456789");
  EXPECT_EQ(src.reloads(), 2);
  // In place (same inode), a different length: seen too.
  Write("t", "fourth-token-0123456789-longer\n");
  EXPECT_EQ(src.Get(), "fourth-token-0123456789-longer");
}

TEST_F(CredentialsTest, TlsWithTokenAndCertificateChecks) {
  SchedulerConnection c;
  c.target = "127.0.0.1:1";
  c.tls_cert = Write("cert.pem", "x");
  std::string auth, err;
  EXPECT_EQ(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr);  // a cert needs --tls_ca
  c.tls_ca = Write("ca.pem", "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n");
  err.clear();
  EXPECT_EQ(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr);  // cert without key
  c.tls_cert.clear();
  c.token_file = Write("t", "abcdef0123456789\n");
  err.clear();
  ASSERT_NE(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr) << err;
  EXPECT_EQ(auth, "tls+token");
  c.tls_reload_interval_s = 0;  // the static credentials path: same checks
  err.clear();
  ASSERT_NE(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr) << err;
  c.tls_reload_interval_s = -1;
  EXPECT_EQ(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr);
  c.tls_reload_interval_s = 60;
  c.tls_ca = dir_ + "/missing.pem";
  EXPECT_EQ(BuildSchedulerChannel(c, grpc::ChannelArguments(), &auth, &err), nullptr);
}

}  // namespace
}  // namespace ablate::worker
