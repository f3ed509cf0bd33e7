#include "cli/report.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <limits>
#include <set>
#include <sstream>

#include "ablate/v1/ablate.grpc.pb.h"
#include "cli/client.h"
#include "cli/format.h"

namespace ablate::cli {
namespace {

using namespace std::chrono_literals;

std::string Esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string Fmt(double v, int prec = 4) {
  if (!std::isfinite(v)) return "&ndash;";
  char b[64];
  std::snprintf(b, sizeof b, "%.*g", prec, v);
  return b;
}

std::string Px(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

// Factor-level colors: a second palette, distinct from the run colors.
const char* kLevelColors[] = {"#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"};

std::string LevelColor(size_t i) { return kLevelColors[i % (sizeof kLevelColors / sizeof *kLevelColors)]; }

struct Series {
  std::string label;
  std::string color;
  std::string attr;  // extra attributes of the polyline (data-job=..., data-factor=...)
  const ReportCurve* curve = nullptr;
  bool markers = false;
};

// A line chart as inline SVG: axes with ticks, one polyline per series (non-finite points skipped).
std::string Chart(const std::string& title, const std::string& y_label, const std::vector<Series>& series) {
  const double W = 600, H = 300, L = 64, R = 16, T = 28, B = 44;
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const auto& s : series) {
    for (size_t i = 0; i < s.curve->steps.size(); ++i) {
      double v = s.curve->values[i];
      if (!std::isfinite(v)) continue;
      x0 = std::min(x0, double(s.curve->steps[i]));
      x1 = std::max(x1, double(s.curve->steps[i]));
      y0 = std::min(y0, v);
      y1 = std::max(y1, v);
    }
  }
  std::ostringstream o;
  o << "<figure class=\"chart\"><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\" role=\"img\" aria-label=\"" << Esc(title) << "\">"
    << "<text x=\"" << W / 2 << "\" y=\"18\" text-anchor=\"middle\" class=\"t\">" << Esc(title) << "</text>";
  if (!std::isfinite(x0)) {
    o << "<text x=\"" << W / 2 << "\" y=\"" << H / 2 << "\" text-anchor=\"middle\" class=\"n\">no data</text></svg>"
      << "</figure>";
    return o.str();
  }
  if (x1 == x0) x1 = x0 + 1;
  double pad = (y1 - y0) * 0.05;
  if (pad == 0) pad = std::max(std::abs(y0) * 0.05, 1e-6);
  y0 -= pad;
  y1 += pad;
  auto X = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto Y = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\"" << H - T - B
    << "\" class=\"plot\"/>";
  for (int k = 0; k <= 4; ++k) {
    double yv = y0 + (y1 - y0) * k / 4, xv = x0 + (x1 - x0) * k / 4;
    o << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << Px(Y(yv)) << "\" y2=\"" << Px(Y(yv))
      << "\" class=\"g\"/><text x=\"" << L - 6 << "\" y=\"" << Px(Y(yv) + 4) << "\" text-anchor=\"end\">"
      << Fmt(yv, 3) << "</text>";
    o << "<text x=\"" << Px(X(xv)) << "\" y=\"" << H - B + 16 << "\" text-anchor=\"middle\">"
      << Fmt(std::round(xv), 6) << "</text>";
  }
  o << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 8 << "\" text-anchor=\"middle\">step</text>"
    << "<text transform=\"translate(14 " << (T + H - B) / 2 << ") rotate(-90)\" text-anchor=\"middle\">"
    << Esc(y_label) << "</text>";
  for (const auto& s : series) {
    std::ostringstream pts;
    int n = 0;
    for (size_t i = 0; i < s.curve->steps.size(); ++i) {
      double v = s.curve->values[i];
      if (!std::isfinite(v)) continue;
      pts << (n++ ? " " : "") << Px(X(double(s.curve->steps[i]))) << "," << Px(Y(v));
    }
    if (n == 0) continue;
    o << "<polyline " << s.attr << " stroke=\"" << s.color << "\" fill=\"none\" stroke-width=\"2\" "
      << "stroke-linejoin=\"round\" points=\"" << pts.str() << "\"><title>" << Esc(s.label) << "</title></polyline>";
    if (s.markers || n == 1) {
      for (size_t i = 0; i < s.curve->steps.size(); ++i) {
        if (!std::isfinite(s.curve->values[i])) continue;
        o << "<circle cx=\"" << Px(X(double(s.curve->steps[i]))) << "\" cy=\"" << Px(Y(s.curve->values[i]))
          << "\" r=\"3\" fill=\"" << s.color << "\"/>";
      }
    }
  }
  o << "</svg><figcaption>";
  std::set<std::string> shown;
  for (const auto& s : series) {
    if (!shown.insert(s.label).second) continue;
    o << "<span class=\"k\"><i style=\"background:" << s.color << "\"></i>" << Esc(s.label) << "</span>";
  }
  o << "</figcaption></figure>";
  return o.str();
}

std::string FactorsText(const v1::Job& j, const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) {
    auto it = j.factors().find(n);
    if (it != j.factors().end()) s += (s.empty() ? "" : " ") + n + "=" + it->second;
  }
  return s;
}

double Mean(const std::vector<double>& v) {
  double s = 0;
  int n = 0;
  for (double x : v)
    if (std::isfinite(x)) s += x, ++n;
  return n ? s / n : std::nan("");
}

double Min(const std::vector<double>& v) {
  double m = std::nan("");
  for (double x : v)
    if (std::isfinite(x) && !(m <= x)) m = x;
  return m;
}

const char* kCss = R"(
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2330;margin:24px auto;max-width:1240px;padding:0 16px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5a6272}table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e8;padding:3px 9px;text-align:right}th{background:#f3f5f8}td.l,th.l{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure.chart{margin:0;border:1px solid #dde1e8;border-radius:4px;padding:6px}
svg text{font-size:11px;fill:#444}svg text.t{font-size:13px;font-weight:600;fill:#1d2330}svg text.n{fill:#999;font-size:14px}
svg .plot{fill:#fff;stroke:#c9ced8}svg .g{stroke:#eef0f4}figcaption{max-width:600px;font-size:12px}
.k{display:inline-block;margin:2px 10px 2px 0}.k i{display:inline-block;width:14px;height:3px;margin-right:5px;vertical-align:middle}
.state-succeeded{color:#1a7f37}.state-failed{color:#cf222e}.foot{color:#8a91a0;font-size:12px;margin-top:32px}
)";

}  // namespace

std::string RunColor(size_t i) {
  static const char* kRun[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                               "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#006d2c"};
  if (i < sizeof kRun / sizeof *kRun) return kRun[i];
  // Golden-angle hues at fixed saturation/lightness.
  double h = std::fmod(i * 137.508, 360.0) / 60.0, c = 0.55, x = c * (1 - std::abs(std::fmod(h, 2.0) - 1));
  double r = 0, g = 0, b = 0;
  int sector = int(h);
  if (sector == 0) r = c, g = x;
  else if (sector == 1) r = x, g = c;
  else if (sector == 2) g = c, b = x;
  else if (sector == 3) g = x, b = c;
  else if (sector == 4) r = x, b = c;
  else r = c, b = x;
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", int((r + 0.2) * 255), int((g + 0.2) * 255), int((b + 0.2) * 255));
  return buf;
}

std::string RenderReportHtml(const ReportData& d) {
  std::vector<std::string> factors(d.compare.factor_names().begin(), d.compare.factor_names().end());
  if (factors.empty()) {  // nothing varies: show every factor key
    std::set<std::string> keys;
    for (const auto& j : d.jobs)
      for (const auto& [k, v] : j.factors()) keys.insert(k);
    factors.assign(keys.begin(), keys.end());
  }
  std::map<int64_t, const v1::CompareRow*> rows;
  for (const auto& r : d.compare.rows()) rows[r.job_id()] = &r;
  std::vector<const v1::Job*> jobs;
  for (const auto& j : d.jobs) jobs.push_back(&j);
  std::sort(jobs.begin(), jobs.end(), [](auto* a, auto* b) { return a->cell_index() < b->cell_index(); });
  std::map<int64_t, std::string> color;
  for (size_t i = 0; i < jobs.size(); ++i) color[jobs[i]->id()] = RunColor(i);
  static const ReportCurve kEmpty;
  auto curve = [&](int64_t job, const std::string& name) -> const ReportCurve* {
    auto it = d.curves.find(job);
    if (it == d.curves.end()) return &kEmpty;
    auto c = it->second.find(name);
    return c == it->second.end() ? &kEmpty : &c->second;
  };
  auto label = [&](const v1::Job* j) { return "job " + std::to_string(j->id()) + " · " + FactorsText(*j, factors); };

  std::ostringstream o;
  const v1::Sweep& s = d.sweep;
  o << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    << "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    << "<title>Ablate report: " << Esc(s.name()) << " (sweep " << s.id() << ")</title><style>" << kCss
    << "</style></head><body>\n";
  o << "<h1>Sweep " << Esc(s.name()) << " <span class=\"sub\">#" << s.id() << "</span></h1>\n<p class=\"sub\">state "
    << "<b class=\"state-" << SweepStateName(s.state()) << "\">" << SweepStateName(s.state()) << "</b> · "
    << s.total_jobs() << " cells";
  for (const auto& [k, n] : std::map<std::string, int32_t>(s.job_counts().begin(), s.job_counts().end())) {
    if (n) o << " · " << n << " " << Esc(k);
  }
  o << " · factors: " << Esc([&] {
    std::string f;
    for (const auto& n : factors) f += (f.empty() ? "" : ", ") + n;
    return f.empty() ? std::string("none") : f;
  }()) << "</p>\n";

  // Curves of every run.
  o << "<h2 id=\"curves\">Loss curves</h2>\n<div class=\"charts\">";
  for (const auto& [metric, title, markers] :
       std::vector<std::tuple<std::string, std::string, bool>>{{"train/loss", "Train loss", false},
                                                               {"eval/loss", "Eval loss", true}}) {
    std::vector<Series> ss;
    for (auto* j : jobs) {
      ss.push_back({label(j), color[j->id()], "data-job=\"" + std::to_string(j->id()) + "\" data-metric=\"" +
                                                  metric + "\"",
                    curve(j->id(), metric), markers});
    }
    o << Chart(title + " (every run)", metric, ss);
  }
  o << "</div>\n";

  // Cells.
  o << "<h2 id=\"cells\">Cells</h2>\n<table><tr><th>job</th>";
  for (const auto& f : factors) o << "<th class=\"l\">" << Esc(f) << "</th>";
  o << "<th class=\"l\">state</th><th>steps</th><th>final train loss</th><th>final eval loss</th>"
    << "<th>eval perplexity</th><th>tokens/s</th><th>peak memory</th></tr>\n";
  for (auto* j : jobs) {
    const v1::CompareRow* r = rows.count(j->id()) ? rows[j->id()] : nullptr;
    o << "<tr><td><i style=\"display:inline-block;width:10px;height:10px;background:" << color[j->id()]
      << "\"></i> " << j->id() << "</td>";
    for (const auto& f : factors) {
      auto it = j->factors().find(f);
      o << "<td class=\"l\">" << Esc(it == j->factors().end() ? "" : it->second) << "</td>";
    }
    const std::string st = JobStateName(j->state());
    o << "<td class=\"l state-" << st << "\">" << st << "</td><td>" << (r ? r->steps() : j->latest_step())
      << "</td><td>" << Fmt(r ? r->final_train_loss() : NAN) << "</td><td>" << Fmt(r ? r->final_eval_loss() : NAN)
      << "</td><td>" << Fmt(r ? r->eval_perplexity() : NAN) << "</td><td>"
      << Esc(r ? HumanCount(r->tokens_per_sec()) : "-") << "</td><td>"
      << Esc(r ? HumanBytes(r->peak_memory_bytes()) : "-") << "</td></tr>\n";
  }
  o << "</table>\n";

  // One table (and grouped curves) per factor.
  o << "<h2 id=\"factors\">By factor</h2>\n";
  for (const auto& f : factors) {
    std::vector<std::string> levels;
    std::map<std::string, std::vector<const v1::Job*>> by;
    for (auto* j : jobs) {
      auto it = j->factors().find(f);
      std::string v = it == j->factors().end() ? "" : it->second;
      if (!by.count(v)) levels.push_back(v);
      by[v].push_back(j);
    }
    o << "<section id=\"factor-" << Esc(f) << "\"><h3>" << Esc(f) << "</h3>\n<table><tr><th class=\"l\">" << Esc(f)
      << "</th><th>runs</th><th>succeeded</th><th>mean final eval loss</th><th>best final eval loss</th>"
      << "<th>mean final train loss</th><th>mean tokens/s</th><th>max peak memory</th></tr>\n";
    for (const auto& v : levels) {
      std::vector<double> ev, tr, tps, mem;
      int ok = 0;
      for (auto* j : by[v]) {
        ok += j->state() == v1::JOB_STATE_SUCCEEDED;
        if (const v1::CompareRow* r = rows.count(j->id()) ? rows[j->id()] : nullptr) {
          ev.push_back(r->final_eval_loss());
          tr.push_back(r->final_train_loss());
          tps.push_back(r->tokens_per_sec());
          mem.push_back(r->peak_memory_bytes());
        }
      }
      double maxmem = std::nan("");
      for (double m : mem)
        if (std::isfinite(m) && !(maxmem >= m)) maxmem = m;
      o << "<tr><td class=\"l\">" << Esc(v) << "</td><td>" << by[v].size() << "</td><td>" << ok << "</td><td>"
        << Fmt(Mean(ev)) << "</td><td>" << Fmt(Min(ev)) << "</td><td>" << Fmt(Mean(tr)) << "</td><td>"
        << Esc(HumanCount(Mean(tps))) << "</td><td>" << Esc(HumanBytes(maxmem)) << "</td></tr>\n";
    }
    o << "</table>\n<div class=\"charts\">";
    for (const auto& [metric, markers] :
         std::vector<std::pair<std::string, bool>>{{"train/loss", false}, {"eval/loss", true}}) {
      std::vector<Series> ss;
      for (size_t li = 0; li < levels.size(); ++li) {
        for (auto* j : by[levels[li]]) {
          ss.push_back({f + "=" + levels[li], LevelColor(li), "data-factor=\"" + Esc(f) + "\"", curve(j->id(), metric),
                        markers});
        }
      }
      o << Chart(metric + " by " + f, metric, ss);
    }
    o << "</div></section>\n";
  }
  o << "<p class=\"foot\">Generated by <code>ablate report</code>" << (d.generated_at.empty() ? "" : " at ")
    << Esc(d.generated_at) << ". Self-contained: no scripts, no external resources.</p>\n</body></html>\n";
  return o.str();
}

int CmdReport(const Conn& c, int64_t sweep_id, const std::string& out) {
  std::string address;
  auto stub = v1::SweepService::NewStub(OpenSchedulerChannel(c.scheduler_flag, c.state_dir, &address, c.token_file));
  ReportData d;
  {
    v1::GetSweepRequest req;
    req.set_sweep_id(sweep_id);
    auto ctx = CallContext(30s);
    if (auto st = stub->GetSweep(ctx.get(), req, &d.sweep); !st.ok()) return ReportRpcError("GetSweep", st, address);
  }
  {
    v1::ListJobsRequest req;
    req.set_sweep_id(sweep_id);
    v1::ListJobsResponse resp;
    auto ctx = CallContext(30s);
    if (auto st = stub->ListJobs(ctx.get(), req, &resp); !st.ok()) return ReportRpcError("ListJobs", st, address);
    d.jobs.assign(resp.jobs().begin(), resp.jobs().end());
  }
  {
    v1::CompareSweepRequest req;
    req.set_sweep_id(sweep_id);
    auto ctx = CallContext(30s);
    if (auto st = stub->CompareSweep(ctx.get(), req, &d.compare); !st.ok()) {
      return ReportRpcError("CompareSweep", st, address);
    }
  }
  for (const auto& j : d.jobs) {
    v1::GetJobMetricsRequest req;
    req.set_job_id(j.id());
    req.add_names("train/loss");
    req.add_names("eval/loss");
    v1::GetJobMetricsResponse resp;
    auto ctx = CallContext(60s);
    if (auto st = stub->GetJobMetrics(ctx.get(), req, &resp); !st.ok()) {
      return ReportRpcError("GetJobMetrics", st, address);
    }
    for (const auto& s : resp.series()) {
      ReportCurve& cv = d.curves[j.id()][s.name()];
      cv.steps.assign(s.steps().begin(), s.steps().end());
      cv.values.assign(s.values().begin(), s.values().end());
    }
  }
  std::time_t now = std::time(nullptr);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%SZ", std::gmtime(&now));
  d.generated_at = ts;
  std::string html = RenderReportHtml(d);
  std::ofstream f(out, std::ios::binary | std::ios::trunc);
  if (!f || !(f << html) || !(f.flush())) {
    std::cerr << "error: cannot write " << out << "\n";
    return 1;
  }
  std::cout << "wrote " << out << ": sweep " << sweep_id << " (" << d.sweep.name() << "), " << d.jobs.size()
            << " runs, " << html.size() << " bytes\n";
  return 0;
}

}  // namespace ablate::cli
