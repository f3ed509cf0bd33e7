#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "cli/format.h"

namespace ablate::cli {
namespace {

v1::CompareSweepResponse Sample() {
  v1::CompareSweepResponse r;
  r.add_factor_names("model_size");
  r.add_factor_names("context_length");
  auto* a = r.add_rows();
  a->set_job_id(7);
  (*a->mutable_factors())["model_size"] = "tiny";
  (*a->mutable_factors())["context_length"] = "128";
  (*a->mutable_factors())["optimizer"] = "adamw";  // not varying: no column
  a->set_state(v1::JOB_STATE_SUCCEEDED);
  a->set_steps(200);
  a->set_final_train_loss(2.3456789);
  a->set_final_eval_loss(2.5);
  a->set_eval_perplexity(12.18);
  a->set_tokens_per_sec(51234);
  a->set_peak_memory_bytes(3.5 * 1024 * 1024 * 1024);
  auto* b = r.add_rows();
  b->set_job_id(8);
  (*b->mutable_factors())["model_size"] = "mini";
  (*b->mutable_factors())["context_length"] = "256";
  b->set_state(v1::JOB_STATE_FAILED);
  b->set_final_train_loss(NAN);
  b->set_final_eval_loss(NAN);
  b->set_eval_perplexity(NAN);
  b->set_tokens_per_sec(NAN);
  b->set_peak_memory_bytes(NAN);
  return r;
}

TEST(FormatCompare, TableHasFactorColumnsAndHumanUnits) {
  std::string t = FormatCompare(Sample(), CompareFormat::kTable);
  std::vector<std::string> lines;
  for (size_t p = 0, q; (q = t.find('\n', p)) != std::string::npos; p = q + 1) lines.push_back(t.substr(p, q - p));
  ASSERT_EQ(lines.size(), 3u) << t;
  EXPECT_EQ(lines[0].rfind("JOB  model_size  context_length  STATE", 0), 0u) << lines[0];
  EXPECT_EQ(lines[0].find("optimizer"), std::string::npos);
  EXPECT_NE(lines[1].find("2.346"), std::string::npos) << lines[1];
  EXPECT_NE(lines[1].find("51.2k"), std::string::npos) << lines[1];
  EXPECT_NE(lines[1].find("3.5 GiB"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("failed"), std::string::npos);
  EXPECT_NE(lines[2].find(" - "), std::string::npos) << "NaN shows as -: " << lines[2];
  // Aligned: every line of an aligned table with right-aligned last column has the same width.
  EXPECT_EQ(lines[1].size(), lines[0].size());
  EXPECT_EQ(lines[2].size(), lines[0].size());
}

TEST(FormatCompare, CsvIsRawAndJsonHasNulls) {
  std::string csv = FormatCompare(Sample(), CompareFormat::kCsv);
  EXPECT_EQ(csv.substr(0, csv.find('\n')),
            "job_id,model_size,context_length,state,steps,final_train_loss,final_eval_loss,eval_perplexity,"
            "tokens_per_sec,peak_memory_bytes");
  EXPECT_NE(csv.find("7,tiny,128,succeeded,200,2.3456789,2.5,12.18,51234,3758096384\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find("8,mini,256,failed,0,,,,,\n"), std::string::npos) << csv;
  auto j = nlohmann::json::parse(FormatCompare(Sample(), CompareFormat::kJson));
  ASSERT_EQ(j["rows"].size(), 2u);
  EXPECT_EQ(j["rows"][0]["factors"]["model_size"], "tiny");
  EXPECT_DOUBLE_EQ(j["rows"][0]["tokens_per_sec"].get<double>(), 51234);
  EXPECT_TRUE(j["rows"][1]["final_eval_loss"].is_null());
  EXPECT_EQ(j["factor_names"], nlohmann::json({"model_size", "context_length"}));
}

TEST(Format, CsvQuoting) {
  EXPECT_EQ(FormatCsv({"a", "b"}, {{"x,y", "say \"hi\""}}), "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n");
}

TEST(Format, HumanUnits) {
  EXPECT_EQ(HumanBytes(512), "512 B");
  EXPECT_EQ(HumanBytes(1536), "1.5 KiB");
  EXPECT_EQ(HumanBytes(NAN), "-");
  EXPECT_EQ(HumanCount(999), "999");
  EXPECT_EQ(HumanCount(1.5e6), "1.5M");
  EXPECT_EQ(FormatNumber(NAN), "-");
  EXPECT_EQ(ProgressBar(5, 10, 10), "[#####.....]");
  EXPECT_EQ(ProgressBar(50, 10, 4), "[####]");
  EXPECT_EQ(ProgressBar(1, 0, 3), "[...]");
}

TEST(Format, JobsTableShowsStepOfTotalAndLatestMetrics) {
  v1::Job j;
  j.set_id(3);
  j.set_state(v1::JOB_STATE_RUNNING);
  j.set_attempt(2);
  j.set_latest_step(50);
  j.set_total_steps(200);
  (*j.mutable_factors())["model_size"] = "tiny";
  (*j.mutable_latest_metrics())["train/loss"] = 3.14159;
  (*j.mutable_latest_metrics())["train/tokens_per_sec"] = 12000;
  std::string t = FormatJobs({j}, true);
  EXPECT_NE(t.find("model_size"), std::string::npos);
  EXPECT_NE(t.find("50/200"), std::string::npos) << t;
  EXPECT_NE(t.find("3.142"), std::string::npos) << t;
  EXPECT_NE(t.find("12.0k"), std::string::npos) << t;
  EXPECT_NE(t.find("[#####...............]"), std::string::npos) << t;
}

TEST(Format, JobsTableNamesTheFailureClassOfAnUnschedulableGang) {
  v1::Job j;
  j.set_id(9);
  j.set_state(v1::JOB_STATE_FAILED);
  j.set_failure_class(v1::FAILURE_CLASS_UNSCHEDULABLE);
  std::string t = FormatJobs({j}, false);
  EXPECT_NE(t.find("failed(unschedulable)"), std::string::npos) << t;
}

TEST(Format, SweepSummaryOrder) {
  v1::Sweep s;
  s.set_id(4);
  s.set_name("demo");
  s.set_state(v1::SWEEP_STATE_ACTIVE);
  s.set_total_jobs(4);
  (*s.mutable_job_counts())["succeeded"] = 1;
  (*s.mutable_job_counts())["queued"] = 3;
  EXPECT_EQ(SweepSummary(s), "sweep 4 demo: active  4 jobs: 3 queued, 1 succeeded");
}

}  // namespace
}  // namespace ablate::cli
