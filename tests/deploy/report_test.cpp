// Unit tests of the HTML report renderer (cli/report.h): pure function, no scheduler.
#include <gtest/gtest.h>

#include <cmath>
#include <regex>
#include <set>

#include "cli/report.h"

namespace ablate::cli {
namespace {

ReportData Demo() {
  ReportData d;
  d.sweep.set_id(7);
  d.sweep.set_name("demo<script>alert(1)</script>");
  d.sweep.set_state(v1::SWEEP_STATE_SUCCEEDED);
  d.sweep.set_total_jobs(4);
  (*d.sweep.mutable_job_counts())["succeeded"] = 4;
  d.compare.add_factor_names("model_size");
  d.compare.add_factor_names("context_length");
  int id = 10;
  for (const char* ms : {"tiny", "mini"}) {
    for (const char* ctx : {"32", "64"}) {
      v1::Job j;
      j.set_id(id);
      j.set_cell_index(id - 10);
      j.set_state(v1::JOB_STATE_SUCCEEDED);
      (*j.mutable_factors())["model_size"] = ms;
      (*j.mutable_factors())["context_length"] = ctx;
      d.jobs.push_back(j);
      auto* r = d.compare.add_rows();
      r->set_job_id(id);
      r->set_final_eval_loss(3.0 + id * 0.01);
      r->set_final_train_loss(2.9);
      r->set_tokens_per_sec(1000);
      r->set_peak_memory_bytes(1 << 20);
      r->set_steps(60);
      ReportCurve train, eval;
      for (int s = 5; s <= 60; s += 5) {
        train.steps.push_back(s);
        train.values.push_back(s == 30 ? std::nan("") : 5.0 - s * 0.03 + id * 0.01);
      }
      eval.steps = {20, 40, 60};
      eval.values = {4.0, 3.5, 3.2};
      d.curves[id]["train/loss"] = train;
      d.curves[id]["eval/loss"] = eval;
      ++id;
    }
  }
  return d;
}

TEST(ReportTest, OneColoredCurvePerRunAndMetric) {
  std::string html = RenderReportHtml(Demo());
  std::regex poly("<polyline data-job=\"(\\d+)\" data-metric=\"([a-z/]+)\" stroke=\"(#[0-9a-f]{6})\"");
  std::set<std::string> jobs, colors;
  int n = 0;
  for (std::sregex_iterator it(html.begin(), html.end(), poly), end; it != end; ++it, ++n) {
    jobs.insert((*it)[1]);
    colors.insert((*it)[3]);
  }
  EXPECT_EQ(n, 8);  // 4 runs x (train, eval)
  EXPECT_EQ(jobs, (std::set<std::string>{"10", "11", "12", "13"}));
  EXPECT_EQ(colors.size(), 4u);
  EXPECT_EQ(html.find("NaN"), std::string::npos);  // the NaN point is skipped, not drawn
  EXPECT_EQ(html.find("nan,"), std::string::npos);
}

TEST(ReportTest, TablePerFactorAndSelfContained) {
  std::string html = RenderReportHtml(Demo());
  EXPECT_NE(html.find("id=\"factor-model_size\""), std::string::npos);
  EXPECT_NE(html.find("id=\"factor-context_length\""), std::string::npos);
  EXPECT_NE(html.find("train/loss by model_size"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);  // the name is escaped; no scripts at all
  EXPECT_NE(html.find("demo&lt;script&gt;"), std::string::npos);
  EXPECT_EQ(html.find("src=\"http"), std::string::npos);
  EXPECT_EQ(html.find("href=\"http"), std::string::npos);
  EXPECT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u);
}

TEST(ReportTest, NoCurvesSaysNoData) {
  ReportData d = Demo();
  d.curves.clear();
  std::string html = RenderReportHtml(d);
  EXPECT_EQ(html.find("<polyline"), std::string::npos);
  EXPECT_NE(html.find("no data"), std::string::npos);
}

TEST(ReportTest, RunColorsAreDistinct) {
  std::set<std::string> c;
  for (size_t i = 0; i < 40; ++i) c.insert(RunColor(i));
  EXPECT_EQ(c.size(), 40u);
}

}  // namespace
}  // namespace ablate::cli
