// The CLI side of signed tokens (cli/token.h, cli/client.h): `ablate token issue` and keygen, the TTL cap, the
// local stack's per-call token minted from its signing key, and --token_file re-read when it changes.
#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/client.h"
#include "cli/pki.h"
#include "cli/token.h"
#include "scheduler/rpc/jwt.h"
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

class TokenTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"ablate-token-test"};
  void SetUp() override {
    dir_ = tmp_.path();
    for (const char* v : {"ABLATE_CA", "ABLATE_TOKEN", "ABLATE_TOKEN_FILE", "ABLATE_TLS_SERVER_NAME"}) unsetenv(v);
    key_ = dir_ + "/signing.key";
    ASSERT_EQ(CmdTokenKeygen(key_, false), 0);
  }

  jwt::Claims Verify(const std::string& token, jwt::Error want = jwt::Error::kOk) {
    std::vector<std::string> keys;
    std::string warn, err;
    EXPECT_TRUE(jwt::ReadKeyFile(key_, &keys, &warn, &err)) << err;
    jwt::Claims c;
    EXPECT_EQ(jwt::Verify(token, keys, jwt::NowSeconds(), jwt::kLeewaySeconds, &c, &err), want) << err;
    return c;
  }
  // Replaces a file with a new one renamed over it.
  void Replace(const std::string& p, const std::string& content) {
    { std::ofstream(p + ".tmp") << content; }
    ::chmod((p + ".tmp").c_str(), 0600);
    fs::rename(p + ".tmp", p);
  }

  std::string dir_, key_;
};

TEST_F(TokenTest, KeygenWritesAPrivateKeyAndRefusesToOverwrite) {
  struct stat st {};
  ASSERT_EQ(::stat(key_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(Read(key_).size(), 65u);
  const std::string old = Read(key_);
  EXPECT_NE(CmdTokenKeygen(key_, false), 0);
  EXPECT_EQ(Read(key_), old);
  EXPECT_EQ(CmdTokenKeygen(key_, true), 0);
  EXPECT_NE(Read(key_), old);
}

TEST_F(TokenTest, IssueMintsAVerifiableShortLivedToken) {
  TokenIssueOptions o;
  o.key_file = key_;
  o.tenant = "team-a";
  o.role = "worker";
  EXPECT_EQ(CmdTokenIssue(o), 2);  // a worker token needs --subject (the worker id)
  o.subject = "w1";
  o.out = dir_ + "/w1.token";
  ASSERT_EQ(CmdTokenIssue(o), 0);
  struct stat st {};
  ASSERT_EQ(::stat(o.out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  std::string tok = Read(o.out);
  ASSERT_FALSE(tok.empty());
  tok.pop_back();
  jwt::Claims c = Verify(tok);
  EXPECT_EQ(c.sub, "w1");
  EXPECT_EQ(c.role, "worker");
  EXPECT_EQ(c.tenant, "team-a");
  EXPECT_EQ(c.exp - c.iat, 3600);  // default 1h
  EXPECT_EQ(c.jti.size(), 32u);
  // The TTL cap: more than 24h only with --allow_long_ttl; bad durations refused.
  o.ttl = "25h";
  EXPECT_EQ(CmdTokenIssue(o), 2);
  o.allow_long_ttl = true;
  EXPECT_EQ(CmdTokenIssue(o), 0);
  o.ttl = "0";
  EXPECT_EQ(CmdTokenIssue(o), 2);
  o.ttl = "1x";
  EXPECT_EQ(CmdTokenIssue(o), 2);
  // An already expired token (--backdate), and a token signed with another key.
  TokenRequest r;
  r.key_file = key_;
  r.subject = "bob";
  r.tenant = "t";
  r.role = "user";
  r.ttl_s = 60;
  r.backdate_s = 7200;
  std::string expired;
  std::string err;
  ASSERT_TRUE(MintToken(r, &expired, nullptr, &err)) << err;
  Verify(expired, jwt::Error::kExpired);
  const std::string other = dir_ + "/other.key";
  ASSERT_EQ(CmdTokenKeygen(other, false), 0);
  r.key_file = other;
  r.backdate_s = 0;
  std::string foreign;
  ASSERT_TRUE(MintToken(r, &foreign, nullptr, &err)) << err;
  Verify(foreign, jwt::Error::kSignature);
  // Refusals: bad role, '*' subject, missing key.
  r.key_file = key_;
  r.role = "root";
  EXPECT_FALSE(MintToken(r, &foreign, nullptr, &err));
  r.role = "worker";
  r.subject = "*";
  EXPECT_FALSE(MintToken(r, &foreign, nullptr, &err));
  r.subject = "w1";
  r.key_file = dir_ + "/missing.key";
  EXPECT_FALSE(MintToken(r, &foreign, nullptr, &err));
}

TEST_F(TokenTest, LocalStackMintsAFreshTokenPerCall) {
  std::ofstream(dir_ + "/stack.json") << R"({"scheduler":"127.0.0.1:4242","tls":{"ca":")" << dir_
                                      << R"(/ca.pem","server_name":"localhost","token_file":")" << dir_
                                      << R"(/user.token","token_signing_key":")" << key_ << R"("}})";
  ClientSecurity s = ResolveClientSecurity("127.0.0.1:4242", dir_);
  EXPECT_TRUE(s.tls());
  EXPECT_EQ(s.signing_key_file, key_);
  EXPECT_TRUE(s.warning.empty()) << s.warning;
  const std::string t1 = CallToken(s), t2 = CallToken(s);
  ASSERT_FALSE(t1.empty());
  EXPECT_NE(t1, t2);  // a new jti every call
  jwt::Claims c = Verify(t1);
  EXPECT_EQ(c.role, "user");
  EXPECT_EQ(c.sub, "local-user");
  EXPECT_LE(c.exp - c.iat, 3600);
  // An explicit token still wins over the stack's key.
  setenv("ABLATE_TOKEN", "explicit-token-0123456789", 1);
  EXPECT_EQ(CallToken(ResolveClientSecurity("127.0.0.1:4242", dir_)), "explicit-token-0123456789");
  unsetenv("ABLATE_TOKEN");
  EXPECT_EQ(StackSigningKeyFile(dir_), key_);
}

TEST_F(TokenTest, TokenFileIsReReadWhenItChangesAndABrokenOneKeepsTheLastGoodToken) {
  const std::string tf = dir_ + "/cli.token";
  Replace(tf, "first-token-0123456789\n");
  ClientSecurity s = ResolveClientSecurity("127.0.0.1:1", dir_, tf);
  EXPECT_EQ(s.token_file, tf);
  EXPECT_EQ(CallToken(s), "first-token-0123456789");
  Replace(tf, "second-token-0123456789\n");
  EXPECT_EQ(CallToken(s), "second-token-0123456789");
  std::string warning;
  Replace(tf, "\n");  // empty: keeps the last good token, says why
  EXPECT_EQ(CallToken(s, &warning), "second-token-0123456789");
  EXPECT_NE(warning.find("empty"), std::string::npos) << warning;
  fs::remove(tf);
  warning.clear();
  EXPECT_EQ(CallToken(s, &warning), "second-token-0123456789");
  EXPECT_FALSE(warning.empty());
  // $ABLATE_TOKEN_FILE is the same thing from the environment; --token_file wins over $ABLATE_TOKEN.
  Replace(tf, "third-token-0123456789\n");
  setenv("ABLATE_TOKEN_FILE", tf.c_str(), 1);
  EXPECT_EQ(CallToken(ResolveClientSecurity("127.0.0.1:1", dir_)), "third-token-0123456789");
  setenv("ABLATE_TOKEN", "env-token-0123456789", 1);
  EXPECT_EQ(CallToken(ResolveClientSecurity("127.0.0.1:1", dir_)), "env-token-0123456789");
  EXPECT_EQ(CallToken(ResolveClientSecurity("127.0.0.1:1", dir_, tf)), "third-token-0123456789");
  unsetenv("ABLATE_TOKEN");
  unsetenv("ABLATE_TOKEN_FILE");
}

TEST_F(TokenTest, CertsCanRenewALeafAndIssueAnExpiredOne) {
  const std::string pki = dir_ + "/pki";
  PkiOptions o;
  o.workers = {"w1"};
  PkiReport r1, r2, r3;
  std::string err;
  ASSERT_TRUE(EnsurePki(pki, o, &r1, &err)) << err;
  EXPECT_TRUE(fs::exists(pki + "/token-signing.key"));
  const std::string ca = Read(pki + "/ca.pem"), w1 = Read(pki + "/w1.pem"), sched = Read(pki + "/scheduler.pem");
  o.renew = {"scheduler", "w1"};
  ASSERT_TRUE(EnsurePki(pki, o, &r2, &err)) << err;
  EXPECT_EQ(Read(pki + "/ca.pem"), ca);
  EXPECT_NE(Read(pki + "/w1.pem"), w1);
  EXPECT_NE(Read(pki + "/scheduler.pem"), sched);
  o.renew = {"wexp"};
  o.leaf_days = -1;
  ASSERT_TRUE(EnsurePki(pki, o, &r3, &err)) << err;
  FILE* f = std::fopen((pki + "/wexp.pem").c_str(), "r");
  ASSERT_NE(f, nullptr);
  X509* x = PEM_read_X509(f, nullptr, nullptr, nullptr);
  std::fclose(f);
  ASSERT_NE(x, nullptr);
  EXPECT_LT(X509_cmp_current_time(X509_get0_notAfter(x)), 0);   // expired
  EXPECT_LT(X509_cmp_current_time(X509_get0_notBefore(x)), 0);  // and was valid once
  X509_free(x);
  o.leaf_days = 0;
  EXPECT_FALSE(EnsurePki(pki, o, &r3, &err));
}

}  // namespace
}  // namespace ablate::cli
