// The replay half of the compiled load generator (store_load_gen.cpp has the Python
// binding): the plan's types, and `Caller`, one simulated client with its own
// c10d::TCPStore connection, whose `vote`, `learn_notice` and `agree` mirror
// store_load_traffic.py's functions of the same names line by line (keep them in step).
#pragma once

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;
using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC: Python's time.monotonic()

namespace store_load_gen {

enum Kind { ADD = 0, CHECK = 1, CHECK_EACH = 2, CHECK_GET = 3, WAIT = 4, ADD_EACH = 5 };  // store_load_traffic.py
enum Role { RANK = 0, LAUNCHER = 1, RELAY = 2 };
enum Learn { LEARN_POLL = 0, LEARN_WAIT = 1, LEARN_RELAY = 2 };
enum Agree { AGREE_POLL = 0, AGREE_DECIDE = 1 };

struct Op {
  int kind;
  int group;  // index into Plan::groups: the client's keys of the op's slot
  int64_t delta;
};

struct Every {
  double period_s;
  double phase_s;
  std::vector<Op> ops;
};

struct ClientSpec {
  int role, id, node;
  std::vector<Op> init;
  std::vector<Every> every;
};

struct Plan {
  std::string host;
  int port = 0, ranks = 0, connect_threads = 8;
  double seconds = 0, step_s = 0, poll_s = 0, agree_poll_s = 0, relay_wait_s = 0,
         notice_wait_s = 0, start_delay_s = 0.3, vote_slice_s = 0;
  bool wake_on_notice = false;
  int64_t wake_step = 0;
  std::vector<std::vector<std::string>> groups;
  std::vector<ClientSpec> clients;
  std::vector<Op> step_reads, last_voter_ops, vote_slice_ops, learn_poll_ops, agree_poll_ops;
  int learn = LEARN_WAIT, agree = AGREE_DECIDE;
  std::string t_vote, t_votes, t_decision, t_abort_reason, t_join, joined, members, notice;
  int nodes = 0;
};

double now_s() {
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

void sleep_until_s(double t) {
  auto tp = Clock::time_point(std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(t)));
  std::this_thread::sleep_until(tp);
}

std::string fill(const std::string& tmpl, int64_t step, int64_t rank) {
  // store_load_traffic.Templates.key
  std::string out = tmpl;
  auto put = [&out](const std::string& hole, int64_t v) {
    for (size_t at = out.find(hole); at != std::string::npos; at = out.find(hole))
      out.replace(at, hole.size(), std::to_string(v));
  };
  put("{step}", step);
  put("{rank}", rank);
  return out;
}

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }

struct NodeEvent {  // the relayed notice file, seen locally by the node's ranks
  std::mutex m;
  std::condition_variable cv;
  bool set = false;
  void notify() {
    { std::lock_guard<std::mutex> g(m); set = true; }
    cv.notify_all();
  }
  void wait(double timeout_s) {
    std::unique_lock<std::mutex> g(m);
    cv.wait_for(g, std::chrono::duration<double>(timeout_s), [this] { return set; });
  }
};

// One client: store_load_py.Caller.
struct Caller {
  const Plan* plan = nullptr;
  const ClientSpec* spec = nullptr;
  c10::intrusive_ptr<c10d::TCPStore> store;
  bool steady = true;
  std::vector<float> lat, rec_lat;  // microseconds
  int64_t waits = 0, steady_requests = 0, steady_waits = 0;
  double saw = 0, agreed = 0, relayed = 0, published = 0, connect_s = 0;
  std::string error;

  int64_t requests() const { return (int64_t)(lat.size() + rec_lat.size()) + waits; }
  void end_steady() {
    steady_requests = requests();
    steady_waits = waits;
    steady = false;
  }

  template <class F>
  auto call(F&& f) -> decltype(f()) {
    auto t = Clock::now();
    struct Rec {
      Caller* c; Clock::time_point t;
      ~Rec() {
        float us = std::chrono::duration<float, std::micro>(Clock::now() - t).count();
        (c->steady ? c->lat : c->rec_lat).push_back(us);
      }
    } rec{this, t};
    return f();
  }

  int64_t add(const std::string& k, int64_t d) { return call([&] { return store->add(k, d); }); }
  void set(const std::string& k, const std::string& v) {
    call([&] { store->set(k, bytes(v)); });
  }
  std::vector<uint8_t> get(const std::string& k) { return call([&] { return store->get(k); }); }
  bool check(const std::vector<std::string>& ks) { return call([&] { return store->check(ks); }); }
  void multi_get(const std::vector<std::string>& ks) { call([&] { return store->multiGet(ks); }); }
  void compare_set(const std::string& k, const std::string& e, const std::string& d) {
    call([&] { return store->compareSet(k, bytes(e), bytes(d)); });
  }
  // A blocking wait: counted as a request, not as a latency sample; false on timeout.
  bool wait(const std::vector<std::string>& ks, double timeout_s) {
    ++waits;
    try {
      store->wait(ks, std::chrono::milliseconds((int64_t)(timeout_s * 1000)));
      return true;
    } catch (const c10::DistStoreError&) {
      return false;
    }
  }

  void run_op(const Op& op) {
    const auto& keys = plan->groups[op.group];
    if (keys.empty()) return;  // a node's peers in a one-node job
    switch (op.kind) {
      case ADD: add(keys[0], op.delta); break;
      case CHECK: check(keys); break;
      case CHECK_EACH: for (const auto& k : keys) check({k}); break;
      case WAIT: wait(keys, op.delta / 1000.0); break;
      case ADD_EACH: for (const auto& k : keys) add(k, op.delta); break;
      case CHECK_GET:
        if (check(keys)) {
          if (keys.size() == 1) get(keys[0]); else multi_get(keys);
        }
        break;
    }
  }
  void run_ops(const std::vector<Op>& ops) { for (const auto& op : ops) run_op(op); }

  // store_load_py.Caller.periodic; with step_s > 0 a step (vote) every step_s.
  void periodic(double t_start, double t_until, double step_s, double t_notice) {
    const auto& every = spec->every;
    std::vector<double> due;
    for (const auto& e : every) due.push_back(t_start + e.phase_s);
    double next_step = step_s > 0 ? t_start + step_s : 1e300;
    int64_t step = 0;
    while (now_s() < t_until) {
      double t = now_s();
      for (size_t i = 0; i < every.size(); ++i) {
        if (t >= due[i]) {
          run_ops(every[i].ops);
          due[i] += every[i].period_s;
        }
      }
      if (t >= next_step) {
        vote(step, t_notice);
        ++step;
        next_step += step_s;
      }
      double nxt = next_step;
      for (double d : due) nxt = std::min(nxt, d);
      if (nxt > now_s()) sleep_until_s(nxt);
    }
  }

  // store_load_traffic.vote
  bool vote(int64_t step, double t_notice) {
    const Plan& p = *plan;
    run_ops(p.step_reads);
    set(fill(p.t_vote, step, spec->id), "{}");
    std::string decision = fill(p.t_decision, step, 0);
    if (add(fill(p.t_votes, step, 0), 1) == p.ranks) {
      run_ops(p.last_voter_ops);
      compare_set(decision, "", "commit");
    }
    while (!wait({decision}, p.vote_slice_s)) {
      run_ops(p.vote_slice_ops);
      if (now_s() > t_notice) return false;  // the step is aborted by the notice
    }
    get(decision);
    return true;
  }

  // store_load_traffic.learn_notice
  void learn_notice(NodeEvent* relayed) {
    const Plan& p = *plan;
    if (p.learn == LEARN_POLL) {
      while (!check({p.notice})) {
        run_ops(p.learn_poll_ops);
        std::this_thread::sleep_for(std::chrono::duration<double>(p.poll_s));
      }
    } else if (p.learn == LEARN_RELAY) {
      relayed->wait(p.notice_wait_s);
    } else {
      wait({p.notice}, p.notice_wait_s);
    }
    if (p.wake_on_notice) {  // the watcher aborts the decision its rank would block on
      compare_set(fill(p.t_abort_reason, p.wake_step, 0), "", "failure");
      compare_set(fill(p.t_decision, p.wake_step, 0), "", "abort");
    }
  }

  // store_load_traffic.agree
  void agree() {
    const Plan& p = *plan;
    set(fill(p.t_join, 0, spec->id), "{}");
    int64_t count = add(p.joined, 1);
    std::vector<std::string> joins;
    for (int r = 0; r < p.ranks; ++r) joins.push_back(fill(p.t_join, 0, r));
    bool polling = p.agree == AGREE_POLL;
    while (true) {
      if (polling) {
        if (wait({p.members}, p.agree_poll_s)) return;
        run_ops(p.agree_poll_ops);
        count = add(p.joined, 0);
      }
      if (count >= p.ranks && check(joins)) {
        multi_get(joins);
        compare_set(p.members, "", "decided");
        return;
      }
      if (!polling) {
        wait({p.members}, p.notice_wait_s);
        return;
      }
    }
  }

  // store_load_py._rank / _launcher / _relay, after the start barrier.
  void run(double t_start, double t_notice, NodeEvent* node_event) {
    const Plan& p = *plan;
    if (spec->role == RANK) {
      periodic(t_start, t_notice, p.step_s, t_notice);
      end_steady();
      if (spec->id == 0) {
        compare_set(p.notice, "", "failure");
        published = now_s();
      }
      learn_notice(node_event);
      saw = now_s();
      agree();
      agreed = now_s();
    } else if (spec->role == LAUNCHER) {
      periodic(t_start, t_notice, 0, t_notice);
      end_steady();
    } else {  // the node's notice relay
      int64_t steady_slices = 0;
      while (!wait({p.notice}, p.relay_wait_s)) {
        steady_slices += now_s() < t_notice;
        if (now_s() > t_notice + p.notice_wait_s) return;
      }
      steady_requests = steady_slices;  // the wait that returned is the recovery's
      steady = false;
      get(p.notice);
      relayed = now_s();
      node_event->notify();
    }
  }
};

}  // namespace store_load_gen
