// The compiled control-plane load generator (benchmarks/store_load.py --engine cpp): the
// Python binding and the run (connect, start together, collect); the replay itself is
// in store_load_gen.h.
//
// One std::thread per simulated client (a rank, a node's launcher, a node's notice
// relay), each with its own c10d::TCPStore client connection: torch's C++ client, the
// same wire protocol and server the runtime uses. It replays exactly what
// store_load_py.py replays: the periodic requests arrive as data compiled from
// store_load_traffic.py's `Plane` (store_load_cpp.py), and `vote`, `learn_notice` and
// `agree` (store_load_gen.h) mirror the Python functions of the same names line by line
// (keep them in step). No key is spelled here: every key and template comes from
// odyssey/contract.py through Python. Latencies go to per-thread vectors (no lock on the
// hot path); the GIL is released for the whole run.

#include "store_load_gen.h"

namespace {

using namespace store_load_gen;

std::vector<Op> ops_of(const py::handle& h) {
  std::vector<Op> out;
  for (auto item : h) {
    auto t = item.cast<py::tuple>();
    out.push_back({t[0].cast<int>(), t[1].cast<int>(), t[2].cast<int64_t>()});
  }
  return out;
}

Plan plan_of(const py::dict& d) {
  Plan p;
  p.host = d["host"].cast<std::string>();
  p.port = d["port"].cast<int>();
  p.ranks = d["ranks"].cast<int>();
  p.nodes = d["nodes"].cast<int>();
  p.connect_threads = d["connect_threads"].cast<int>();
  p.seconds = d["seconds"].cast<double>();
  p.step_s = d["step_s"].cast<double>();
  p.poll_s = d["poll_s"].cast<double>();
  p.agree_poll_s = d["agree_poll_s"].cast<double>();
  p.vote_slice_s = d["vote_slice_s"].cast<double>();
  p.wake_on_notice = d["wake_on_notice"].cast<bool>();
  p.wake_step = d["wake_step"].cast<int64_t>();
  p.relay_wait_s = d["relay_wait_s"].cast<double>();
  p.notice_wait_s = d["notice_wait_s"].cast<double>();
  p.groups = d["groups"].cast<std::vector<std::vector<std::string>>>();
  p.step_reads = ops_of(d["step_reads"]);
  p.last_voter_ops = ops_of(d["last_voter_ops"]);
  p.vote_slice_ops = ops_of(d["vote_slice_ops"]);
  p.learn_poll_ops = ops_of(d["learn_poll_ops"]);
  p.agree_poll_ops = ops_of(d["agree_poll_ops"]);
  p.learn = d["learn"].cast<int>();
  p.agree = d["agree"].cast<int>();
  auto t = d["templates"].cast<py::dict>();
  p.t_vote = t["vote"].cast<std::string>();
  p.t_votes = t["votes"].cast<std::string>();
  p.t_decision = t["decision"].cast<std::string>();
  p.t_abort_reason = t["abort_reason"].cast<std::string>();
  p.t_join = t["join"].cast<std::string>();
  p.joined = t["joined"].cast<std::string>();
  p.members = t["members"].cast<std::string>();
  p.notice = t["notice"].cast<std::string>();
  for (auto c : d["clients"]) {
    auto cd = c.cast<py::dict>();
    ClientSpec s;
    s.role = cd["role"].cast<int>();
    s.id = cd["id"].cast<int>();
    s.node = cd["node"].cast<int>();
    s.init = ops_of(cd["init"]);
    for (auto e : cd["every"]) {
      auto et = e.cast<py::tuple>();
      s.every.push_back({et[0].cast<double>(), et[1].cast<double>(), ops_of(et[2])});
    }
    p.clients.push_back(std::move(s));
  }
  return p;
}

py::bytes floats(const std::vector<float>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

py::dict run(const py::dict& spec) {
  Plan plan = plan_of(spec);
  size_t n_clients = plan.clients.size();
  std::vector<Caller> callers(n_clients);
  std::vector<std::unique_ptr<NodeEvent>> events;
  for (int i = 0; i < plan.nodes; ++i) events.push_back(std::make_unique<NodeEvent>());
  double t0 = 0, connect_s = 0, t_start = 0, t_notice = 0, threads_s = 0;
  std::string connect_error;
  {
    py::gil_scoped_release nogil;
    t0 = now_s();
    // connect every client first, from a few threads (a burst of 1000+ connects at once
    // would only measure the listen backlog)
    std::atomic<size_t> next{0};
    std::mutex err_m;
    std::vector<std::thread> connectors;
    for (int k = 0; k < std::max(1, plan.connect_threads); ++k) {
      connectors.emplace_back([&] {
        c10d::TCPStoreOptions opts;
        opts.port = (uint16_t)plan.port;
        opts.isServer = false;
        opts.waitWorkers = false;
        opts.timeout = std::chrono::milliseconds(120000);
        for (size_t i; (i = next.fetch_add(1)) < n_clients;) {
          try {
            callers[i].plan = &plan;
            callers[i].spec = &plan.clients[i];
            double t = now_s();
            callers[i].store = c10::make_intrusive<c10d::TCPStore>(plan.host, opts);
            callers[i].connect_s = now_s() - t;
          } catch (const std::exception& e) {
            std::lock_guard<std::mutex> g(err_m);
            connect_error = e.what();
            next = n_clients;
          }
        }
      });
    }
    for (auto& t : connectors) t.join();
    connect_s = now_s() - t0;
    if (connect_error.empty()) {
      // start every thread, let ranks make their init requests, then start together
      std::mutex m;
      std::condition_variable cv;
      size_t ready = 0;
      bool go = false;
      std::vector<std::thread> threads;
      threads.reserve(n_clients);
      double t1 = now_s();
      for (size_t i = 0; i < n_clients; ++i) {
        threads.emplace_back([&, i] {
          Caller& c = callers[i];
          try {
            c.run_ops(c.spec->init);
          } catch (const std::exception& e) {
            c.error = e.what();
          }
          {
            std::unique_lock<std::mutex> g(m);
            ++ready;
            cv.notify_all();
            cv.wait(g, [&] { return go; });
          }
          if (!c.error.empty()) return;
          sleep_until_s(t_start);
          try {
            c.run(t_start, t_notice, events[c.spec->node].get());
          } catch (const std::exception& e) {
            c.error = e.what();
          }
        });
      }
      {
        std::unique_lock<std::mutex> g(m);
        cv.wait(g, [&] { return ready == n_clients; });
        threads_s = now_s() - t1;
        t_start = now_s() + plan.start_delay_s;
        t_notice = t_start + plan.seconds;
        go = true;
      }
      cv.notify_all();
      for (auto& t : threads) t.join();
    }
  }
  py::dict out;
  out["connect_s"] = connect_s;
  out["threads_s"] = threads_s;
  out["connect_error"] = connect_error;
  out["t_start"] = t_start;
  out["t_notice"] = t_notice;
  std::vector<float> lat, rec_lat;
  py::list role, steady, steady_waits, total, saw, agreed, relayed, errors, connect_each;
  double published = 0;
  for (auto& c : callers) {
    lat.insert(lat.end(), c.lat.begin(), c.lat.end());
    rec_lat.insert(rec_lat.end(), c.rec_lat.begin(), c.rec_lat.end());
    role.append(c.spec ? c.spec->role : -1);
    steady.append(c.steady_requests);
    steady_waits.append(c.spec && c.spec->role == RANK ? c.steady_waits : 0);
    total.append(c.requests());
    saw.append(c.saw);
    agreed.append(c.agreed);
    relayed.append(c.relayed);
    connect_each.append(c.connect_s);
    if (c.published > 0) published = c.published;
    if (!c.error.empty()) errors.append(c.error);
    c.store.reset();
  }
  out["lat_us"] = floats(lat);
  out["rec_lat_us"] = floats(rec_lat);
  out["role"] = role;
  out["steady"] = steady;
  out["steady_waits"] = steady_waits;
  out["total"] = total;
  out["saw"] = saw;
  out["agreed"] = agreed;
  out["relayed"] = relayed;
  out["published"] = published;
  out["errors"] = errors;
  out["connect_each_s"] = connect_each;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Control-plane load generator: N threads, each its own c10d::TCPStore client";
  m.def("run", &run, "Replay one point (see benchmarks/store_load_cpp.py)");
}
