// The CPU execution of a CUDA grid for tests/cuda_cpu: every CUDA thread is a fiber, one block at a time.
//
// Scheduling. The blocks of a launch run one after another in a shuffled order. Inside a block, the threads run one
// at a time, each until it blocks (at __syncthreads or a warp collective) or returns, in a shuffled order; a warp
// collective completes when its last lane arrives, and its lanes (in a shuffled order) run next, before the threads
// still waiting to run, so that a warp may run ahead of the others as on a GPU (a collective is no barrier for the
// block); when every thread is blocked, the collectives left are checked (one that cannot complete is a fault), and
// when only __syncthreads waiters are left the barrier opens for all of them (again in a shuffled order). So between two barriers the threads run strictly one after another in an order that differs
// from the program order: a missing barrier makes a thread read what another thread has not written yet (or has
// already overwritten), deterministically for a given seed. The shuffles are drawn from a generator seeded by
// cuda_cpu_set_schedule_seed (one seed per op call from Python), so a failure reproduces.
//
// Faults (a failed CUDA_KERNEL_ASSERT, an out-of-bounds index into a shared array, a barrier that not all threads
// of the block reach, a collective whose lanes disagree or have exited, a write past the dynamic shared memory)
// abort the launch with cuda_cpu::Error naming the kernel, the block and the thread.

#include "cuda_cpu.h"
#include "launchers.h"

#include <link.h>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstdio>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

// The single `extern __shared__` array of the kernels (csrc/common.cuh: mixlora::dynamic_smem): sm_90's largest
// dynamic shared memory per block (227 KiB) plus a canary behind the launch's bytes.
namespace mixlora {
constexpr size_t kMaxDynamicSmem = 227 * 1024;
constexpr size_t kCanaryBytes = 1024;
thread_local float4 mixlora_dynamic_smem[(kMaxDynamicSmem + kCanaryBytes) / sizeof(float4)];
}  // namespace mixlora

namespace cuda_cpu {
namespace {

// Context switches. On x86-64 a switch of stacks that saves the callee-saved registers: ucontext's swapcontext
// makes a sigprocmask system call per switch, which made the kernels with warp shuffles ~10x slower. Elsewhere
// ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

extern "C" void cuda_cpu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .hidden cuda_cpu_switch
  .globl cuda_cpu_switch
  .type cuda_cpu_switch, @function
cuda_cpu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_cpu_switch, .-cuda_cpu_switch
)");

// The first switch to `c` enters entry() on the given stack (entered as if called: rsp = 8 mod 16).
void start_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15}) - 8;
  std::fill(top, top + 8, uintptr_t{0});  // r15, r14, r13, r12, rbx, rbp, return address, padding
  top[6] = reinterpret_cast<uintptr_t>(entry);
  c.sp = top;
}

void switch_context(Context& from, Context& to) {
  cuda_cpu_switch(&from.sp, to.sp);
}
#else
struct Context {
  ucontext_t uc;
};

void start_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}
#endif

// Shared memory is filled with 0xff bytes (NaN as float, -1 as an integer) before every block, as is the canary.
constexpr unsigned char kPoison = 0xff;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kRunnable, kAtBarrier, kAtCollective, kDone };

struct Fiber {
  Context context;
  void* stack = nullptr;  // kStackBytes + a guard page below, from mmap
  uint3 index{};
  State state = State::kRunnable;
  const char* file = nullptr;  // __syncthreads call site
  int line = 0;
  Collective kind{};
  const char* name = nullptr;  // the collective's name, for messages
  unsigned mask = 0;
  uint64_t bits = 0;
  int arg = 0;
  int width = 0;
  uint64_t result = 0;
};

struct Runtime {
  std::vector<std::unique_ptr<Fiber>> fibers;  // pool, grown to the largest block
  Context scheduler;
  Fiber* running = nullptr;  // the fiber executing now (nullptr: the scheduler runs)
  Fiber* blame = nullptr;    // the thread that error messages name
  const char* kernel = "";
  uint3 block{};
  dim3 block_dim, grid_dim;
  size_t smem = 0;
  const std::function<void()>* body = nullptr;
  std::string error;  // set by a faulting fiber
  std::vector<Fiber*> ready, released, waiting;  // run_block's work lists, kept to avoid allocations
  std::mt19937_64 rng{0};
};

Runtime rt;

std::string format_index(const uint3& i) {
  return "(" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " + std::to_string(i.z) + ")";
}

std::string where() {
  std::string s = std::string("kernel ") + rt.kernel + ", block " + format_index(rt.block);
  if (rt.blame != nullptr) {
    s += ", thread " + format_index(rt.blame->index);
  }
  return s;
}

void fiber_main() {
  Fiber* f = rt.running;
  try {
    (*rt.body)();
  } catch (const std::exception& e) {
    rt.error = e.what();
  }
  f->state = State::kDone;
  switch_context(f->context, rt.scheduler);  // never resumed
}

void* allocate_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    throw Error("cuda_cpu: cannot allocate a fiber stack");
  }
  mprotect(base, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
  return static_cast<char*>(base) + page;
}

void switch_to(Fiber* f) {
  rt.running = rt.blame = f;
  switch_context(rt.scheduler, f->context);
  rt.running = rt.blame = nullptr;
  if (!rt.error.empty()) {
    throw Error(rt.error);
  }
}

void shuffle_into(std::vector<Fiber*>& ready, std::vector<Fiber*>& released) {
  std::shuffle(released.begin(), released.end(), rt.rng);
  ready.insert(ready.end(), released.begin(), released.end());
  released.clear();
}

int lane_of(const Fiber* f) {
  return static_cast<int>((f->index.x + rt.block_dim.x * (f->index.y + rt.block_dim.y * f->index.z)) % 32);
}

// Source lane of `lane` for a shuffle, per the CUDA programming guide (segments of `width` lanes).
int source_lane(const Fiber& f, int lane) {
  const int base = lane & ~(f.width - 1);
  switch (f.kind) {
    case Collective::kShfl:
      return base + (f.arg % f.width);
    case Collective::kShflUp:
      return lane - base >= f.arg ? lane - f.arg : lane;
    case Collective::kShflDown:
      return lane - base + f.arg < f.width ? lane + f.arg : lane;
    default: {  // kShflXor: a lane of a later segment is not read
      const int src = lane ^ f.arg;
      return (src & ~(f.width - 1)) > base ? lane : src;
    }
  }
}

// Whether every lane named in the mask of f's collective waits in a collective (of warp `lanes`).
bool collective_arrived(Fiber* const (&lanes)[32], const Fiber* f) {
  for (int m = 0; m < 32; ++m) {
    if ((f->mask >> m & 1u) && (lanes[m] == nullptr || lanes[m]->state != State::kAtCollective)) {
      return false;
    }
  }
  return true;
}

// Resolves every collective of warp `lanes` (nullptr: no such thread) whose lanes have all arrived. all_blocked:
// every thread of the block is blocked or done, so a collective that cannot complete is a fault; otherwise the
// collectives still waiting for lanes are left alone.
void resolve_warp(Fiber* const (&lanes)[32], std::vector<Fiber*>& released, bool all_blocked) {
  for (int l = 0; l < 32; ++l) {
    Fiber* f = lanes[l];
    if (f == nullptr || f->state != State::kAtCollective || (!all_blocked && !collective_arrived(lanes, f))) {
      continue;
    }
    rt.blame = f;
    for (int m = 0; m < 32; ++m) {
      if (!(f->mask >> m & 1u)) {
        continue;
      }
      const Fiber* g = lanes[m];
      if (g == nullptr) {
        fault(std::string(f->name) + ": mask 0x" + std::to_string(f->mask) + " names lane " + std::to_string(m) +
              ", which this block does not have");
      }
      if (g->state == State::kDone) {
        fault(std::string(f->name) + ": lane " + std::to_string(m) + " of the mask has exited");
      }
      if (g->state == State::kAtBarrier) {
        fault(std::string(f->name) + " waits for lane " + std::to_string(m) + ", which waits in __syncthreads at " +
              g->file + ":" + std::to_string(g->line));
      }
      if (g->kind != f->kind || g->mask != f->mask) {
        fault(std::string(f->name) + " with mask " + std::to_string(f->mask) + " meets " + g->name + " with mask " +
              std::to_string(g->mask) + " in lane " + std::to_string(m));
      }
    }
    rt.blame = nullptr;
    uint64_t votes = 0;
    for (int m = 0; m < 32; ++m) {
      if (f->mask >> m & 1u) {
        votes |= (lanes[m]->bits != 0 ? uint64_t{1} : 0) << m;
      }
    }
    for (int m = 0; m < 32; ++m) {
      if (!(f->mask >> m & 1u)) {
        continue;
      }
      Fiber* g = lanes[m];
      switch (g->kind) {
        case Collective::kBallot:
          g->result = votes;
          break;
        case Collective::kAny:
          g->result = votes != 0;
          break;
        case Collective::kAll:
          g->result = votes == f->mask;
          break;
        case Collective::kSyncWarp:
          g->result = 0;
          break;
        default: {
          const int src = source_lane(*g, m);
          rt.blame = g;
          if (!(g->mask >> src & 1u)) {
            fault(std::string(g->name) + " reads lane " + std::to_string(src) + ", which is not in the mask");
          }
          rt.blame = nullptr;
          g->result = lanes[src]->bits;
        }
      }
    }
    for (int m = 0; m < 32; ++m) {
      if (f->mask >> m & 1u) {
        lanes[m]->state = State::kRunnable;
        released.push_back(lanes[m]);
      }
    }
  }
}

// This thread's instance of the library's TLS segment, i.e. all shared memory: the static __shared__ arrays of every
// kernel (thread_local, cuda_cpu.h) and mixlora_dynamic_smem; nothing else in the library is thread_local.
struct SharedMemory {
  unsigned char* data = nullptr;
  size_t size = 0;
  size_t initialised = 0;  // bytes of .tdata: must be 0, or poisoning would overwrite initialised thread_locals
};

SharedMemory find_shared_memory() {
  SharedMemory found;
  mixlora::mixlora_dynamic_smem[0].x = 0.0f;  // this thread's instance exists from here on
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        const auto* mine = reinterpret_cast<const unsigned char*>(mixlora::mixlora_dynamic_smem);
        const auto* data = static_cast<unsigned char*>(info->dlpi_tls_data);
        for (int h = 0; h < info->dlpi_phnum && data != nullptr; ++h) {
          const ElfW(Phdr)& phdr = info->dlpi_phdr[h];
          if (phdr.p_type == PT_TLS && mine >= data && mine < data + phdr.p_memsz) {
            *static_cast<SharedMemory*>(out) = {const_cast<unsigned char*>(data), phdr.p_memsz, phdr.p_filesz};
            return 1;
          }
        }
        return 0;
      },
      &found);
  if (found.data == nullptr || found.initialised != 0) {
    throw Error("cuda_cpu: cannot find the shared memory (the library's uninitialised TLS segment)");
  }
  return found;
}

void run_block(std::vector<Fiber*>& threads, const SharedMemory& shared) {
  std::memset(shared.data, kPoison, shared.size);
  for (size_t t = 0; t < threads.size(); ++t) {
    threads[t]->state = State::kRunnable;
    // Stack tops staggered by 64 bytes per thread (mod 4 KiB): at equal offsets every thread's hot stack lines
    // would compete for the same cache sets.
    start_context(threads[t]->context, threads[t]->stack, kStackBytes - 64 * (t % 64), fiber_main);
  }
  std::vector<Fiber*>& ready = rt.ready;
  std::vector<Fiber*>& released = rt.released;
  std::vector<Fiber*>& waiting = rt.waiting;
  ready.clear();
  released.assign(threads.begin(), threads.end());
  shuffle_into(ready, released);
  auto warp_of = [&threads](const Fiber* f, Fiber* (&lanes)[32]) {
    const size_t w = (f->index.x + rt.block_dim.x * (f->index.y + rt.block_dim.y * f->index.z)) / 32 * 32;
    for (size_t l = 0; l < 32; ++l) {
      lanes[l] = w + l < threads.size() ? threads[w + l] : nullptr;
    }
  };
  while (true) {
    while (!ready.empty()) {
      Fiber* f = ready.back();
      ready.pop_back();
      switch_to(f);
      Fiber* lanes[32];
      if (f->state == State::kAtCollective && (warp_of(f, lanes), collective_arrived(lanes, f))) {
        resolve_warp(lanes, released, false);  // its last lane: the warp runs next
        shuffle_into(ready, released);
      }
    }
    // Everybody is blocked or done: warp collectives first.
    for (size_t w = 0; w < threads.size(); w += 32) {
      Fiber* lanes[32] = {};
      for (size_t l = 0; l < 32 && w + l < threads.size(); ++l) {
        lanes[l] = threads[w + l];
      }
      resolve_warp(lanes, released, true);
    }
    if (!released.empty()) {
      shuffle_into(ready, released);
      continue;
    }
    waiting.clear();
    const Fiber* exited = nullptr;
    for (Fiber* f : threads) {
      if (f->state == State::kAtBarrier) {
        waiting.push_back(f);
      } else {
        exited = f;  // kDone: nothing else is left once the collectives are resolved
      }
    }
    if (waiting.empty()) {
      break;
    }
    rt.blame = waiting.front();
    if (exited != nullptr) {
      fault("__syncthreads at " + std::string(waiting.front()->file) + ":" + std::to_string(waiting.front()->line) +
            " while thread " + format_index(exited->index) + " has exited");
    }
    for (const Fiber* f : waiting) {
      if (f->line != waiting.front()->line || std::strcmp(f->file, waiting.front()->file) != 0) {
        fault("__syncthreads at " + std::string(waiting.front()->file) + ":" + std::to_string(waiting.front()->line) +
              " while thread " + format_index(f->index) + " waits in __syncthreads at " + f->file + ":" +
              std::to_string(f->line));
      }
    }
    rt.blame = nullptr;
    for (Fiber* f : waiting) {
      f->state = State::kRunnable;
    }
    shuffle_into(ready, waiting);
  }
  const unsigned char* canary = reinterpret_cast<const unsigned char*>(mixlora::mixlora_dynamic_smem) + rt.smem;
  for (size_t b = 0; b < mixlora::kCanaryBytes; ++b) {
    if (canary[b] != kPoison) {
      throw Error(where() + ": wrote byte " + std::to_string(rt.smem + b) + " of dynamic shared memory, past the " +
                  std::to_string(rt.smem) + " bytes of the launch");
    }
  }
}

std::mutex launch_mutex;  // one launch at a time: blocks share the thread_local shared memory

}  // namespace

const uint3& thread_idx() {
  return rt.running->index;
}
const uint3& block_idx() {
  return rt.block;
}
const dim3& block_dim() {
  return rt.block_dim;
}
const dim3& grid_dim() {
  return rt.grid_dim;
}

std::string last_error;

int guarded(const std::function<void()>& launches) {
  last_error.clear();
  try {
    launches();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// In a fiber, the fault ends the fiber without unwinding its stack (the handlers of -fsanitize=bounds are called
// from code compiled as not throwing): the scheduler resumes and throws.
void fault(const std::string& what) {
  if (rt.running == nullptr) {
    throw Error(where() + ": " + what);
  }
  rt.error = where() + ": " + what;
  rt.running->state = State::kDone;
  switch_context(rt.running->context, rt.scheduler);  // never resumed
  std::abort();
}

void syncthreads(const char* file, int line) {
  Fiber* f = rt.running;
  f->state = State::kAtBarrier;
  f->file = file;
  f->line = line;
  switch_context(f->context, rt.scheduler);
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t bits, int arg, int width, const char* name) {
  Fiber* f = rt.running;
  const int lane = lane_of(f);
  if (!(mask >> lane & 1u)) {
    fault(std::string(name) + ": the mask does not name the calling lane " + std::to_string(lane));
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fault(std::string(name) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  }
  f->state = State::kAtCollective;
  f->kind = kind;
  f->name = name;
  f->mask = mask;
  f->bits = bits;
  f->arg = arg;
  f->width = width;
  switch_context(f->context, rt.scheduler);
  return f->result;
}

void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  rt.kernel = name;
  rt.error.clear();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || blocks == 0 || grid.y > 65535 || grid.z > 65535) {
    throw Error(std::string(name) + ": invalid launch configuration grid (" + std::to_string(grid.x) + ", " +
                std::to_string(grid.y) + ", " + std::to_string(grid.z) + ") block (" + std::to_string(block.x) +
                ", " + std::to_string(block.y) + ", " + std::to_string(block.z) + ")");
  }
  if (smem > mixlora::kMaxDynamicSmem) {
    throw Error(std::string(name) + ": " + std::to_string(smem) + " bytes of dynamic shared memory exceed " +
                std::to_string(mixlora::kMaxDynamicSmem));
  }
  rt.grid_dim = grid;
  rt.block_dim = block;
  rt.smem = smem;
  rt.body = &body;
  while (rt.fibers.size() < threads) {
    auto f = std::make_unique<Fiber>();
    f->stack = allocate_stack();
    rt.fibers.push_back(std::move(f));
  }
  std::vector<Fiber*> fibers;
  for (unsigned z = 0; z < block.z; ++z) {
    for (unsigned y = 0; y < block.y; ++y) {
      for (unsigned x = 0; x < block.x; ++x) {
        Fiber* f = rt.fibers[fibers.size()].get();
        f->index = {x, y, z};
        fibers.push_back(f);
      }
    }
  }
  const SharedMemory shared = find_shared_memory();  // per launch: the calling thread's instance
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  std::shuffle(order.begin(), order.end(), rt.rng);
  for (const uint64_t b : order) {
    rt.block = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                static_cast<unsigned>(b / grid.x / grid.y)};
    run_block(fibers, shared);
  }
}

}  // namespace cuda_cpu

// -fsanitize=bounds reports an out-of-bounds index into an array of known size (the static shared arrays and the
// kernels' local arrays), -fsanitize=object-size an access through a pointer that the compiler can trace to such an
// array (a shared tile handed to an inlined device helper). The sanitizer runtime is not linked: these handlers
// turn the reports into kernel faults.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct OutOfBoundsData {
  SourceLocation location;
  const void* array_type;
  const void* index_type;
};
struct TypeMismatchData {  // object-size is the only check of this kind enabled
  SourceLocation location;
  const void* type;
  unsigned char log_alignment;
  unsigned char kind;  // 0 load, 1 store, others: reference binding, member access, ...
};
}  // namespace

extern "C" {

[[noreturn]] void __ubsan_handle_out_of_bounds(OutOfBoundsData* data, void* index) {
  cuda_cpu::fault("array index " + std::to_string(reinterpret_cast<intptr_t>(index)) + " out of bounds at " +
                  data->location.file + ":" + std::to_string(data->location.line));
}

[[noreturn]] void __ubsan_handle_out_of_bounds_abort(OutOfBoundsData* data, void* index) {
  __ubsan_handle_out_of_bounds(data, index);
}

[[noreturn]] void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, void* /*pointer*/) {
  cuda_cpu::fault(std::string(data->kind == 0 ? "load" : data->kind == 1 ? "store" : "access") +
                  " outside the array it points into at " + data->location.file + ":" +
                  std::to_string(data->location.line));
}

[[noreturn]] void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* data, void* pointer) {
  __ubsan_handle_type_mismatch_v1(data, pointer);
}

// The C ABI of the harness library (tests/cuda_cpu/cuda_cpu_harness.py): the schedule seed and the last error.
void cuda_cpu_set_schedule_seed(uint64_t seed) {
  cuda_cpu::rt.rng.seed(seed);
}

const char* cuda_cpu_last_error() {
  return cuda_cpu::last_error.c_str();
}

}  // extern "C"
