// A C++ library with thread-local state and exceptions, for tests/test_host_tls.py.
// Built with g++ -fPIC -shared (general-dynamic TLS), once more with -mtls-dialect=gnu2.
#include <atomic>
#include <stdexcept>
#include <string>

static std::atomic<int> constructions{0};

struct Tally {                 // a thread_local with a constructor (and a trivial destructor)
    long base;
    long hits;
    Tally() : base(1000), hits(0) { constructions.fetch_add(1); }
};

thread_local int counter = 7;              // exported: DTPMOD64 + DTPOFF64 against it
static thread_local int hidden = 3;        // local-dynamic: DTPMOD64 against symbol 0
thread_local Tally tally;

extern "C" int bump_counter(void) { return ++counter; }
extern "C" int bump_hidden(void) { return hidden += 2; }
extern "C" long bump_tally(void) { return tally.base + ++tally.hits; }
extern "C" int *counter_address(void) { return &counter; }
extern "C" int tally_constructions(void) { return constructions.load(); }

__attribute__((noinline)) static int thrower(int x) {
    if (x > 0)
        throw std::runtime_error("boom " + std::to_string(x));
    return x;
}

// Throws and catches inside C++.
extern "C" int throw_inside(int x) {
    try {
        return thrower(x);
    } catch (const std::exception &e) {
        return 100 + static_cast<int>(std::string(e.what()).size());
    }
}

// An extern "C" function that throws; catch_across calls it through a pointer (no inlining)
// and catches the std::runtime_error on the other side of the extern "C" frame.
extern "C" __attribute__((noinline)) int throws_c(int x) {
    if (x)
        throw std::runtime_error("across");
    return 0;
}
int (*volatile throws_c_ptr)(int) = throws_c;

extern "C" int catch_across(int x) {
    try {
        return throws_c_ptr(x);
    } catch (const std::runtime_error &e) {
        return std::string(e.what()) == "across" ? 42 : -1;
    }
}

// std::call_once uses libstdc++'s thread_local __once_callable and __once_call: DTPMOD64 and
// DTPOFF64 against TLS variables another object defines.
#include <mutex>
static std::once_flag once;
static int once_runs;
extern "C" int call_once_twice(void) {
    std::call_once(once, [] { once_runs++; });
    std::call_once(once, [] { once_runs++; });
    return once_runs;
}

// A thread Python never saw (std::thread): its own counter, from the initial value.
#include <thread>
extern "C" int bump_in_std_thread(void) {
    int last = 0;
    std::thread worker([&last] { for (int i = 0; i < 3; i++) last = bump_counter(); });
    worker.join();
    return last;
}
