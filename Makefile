# A thin wrapper over CMake. ./scripts/setup installs the Debian packages and
# then calls these targets; `make help` lists them.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
# The private PostgreSQL of fuzz_kafka (in /tmp: the server may run as postgres).
FUZZ_PG_DIR ?= /tmp/loom-fuzz-pg-$(shell printf %s "$(CURDIR)" | md5sum | cut -c1-8)
JOBS       ?= $(shell nproc)
CMAKE_ARGS ?=
LOOM       := $(BUILD)/cmd/loom/loom
SOURCES     = $(shell git ls-files --cached --others --exclude-standard '*.c' '*.h' 2>/dev/null || find engine ops consumers api cmd tests -name '*.[ch]')

.PHONY: help build run test check asan fuzz format format-check clean

help:
	@echo "make build         configure and build into $(BUILD)/ (warnings are errors)"
	@echo "make run           build, then run 'loom dev' (private Postgres; Ctrl-C stops it)"
	@echo "make test          format check, build, the whole test suite, again under ASan+UBSan, then fuzz"
	@echo "make check         build and run the test suite once (no sanitizers)"
	@echo "make asan          build into $(ASAN_BUILD)/ with ASan+UBSan and run the test suite"
	@echo "make fuzz          build the libFuzzer targets (clang) into $(FUZZ_BUILD)/ and run each $(FUZZ_SECONDS)s"
	@echo "make format        apply .clang-format to every C file"
	@echo "make format-check  fail when a C file is not formatted"
	@echo "make clean         remove the build directories"

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DLOOM_WERROR=ON $(CMAKE_ARGS)

build: $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(LOOM) dev

check: build
	cd $(BUILD) && ctest --output-on-failure -j 2

$(ASAN_BUILD)/build.ninja:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DLOOM_WERROR=ON -DLOOM_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=Debug $(CMAKE_ARGS)

asan: $(ASAN_BUILD)/build.ninja
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 2

# Fuzzing: request parsing, routing and JSON bodies, and Kafka messages
# through decode and record against a private PostgreSQL (tests/fuzz/), with
# ASan+UBSan, for FUZZ_SECONDS, from the seed corpus (new inputs go to a
# scratch copy; crashes are written to $(FUZZ_BUILD)/ and fail the target).
$(FUZZ_BUILD)/build.ninja:
	cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_C_COMPILER=clang -DLOOM_FUZZ=ON \
	  -DLOOM_SANITIZE=ON -DLOOM_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Debug $(CMAKE_ARGS)

fuzz: $(FUZZ_BUILD)/build.ninja
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_http fuzz_kafka
	rm -rf $(FUZZ_BUILD)/corpus-http && mkdir -p $(FUZZ_BUILD)/corpus-http
	cd $(FUZZ_BUILD) && UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ./tests/fuzz/fuzz_http -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -timeout=10 \
	  -rss_limit_mb=2048 -print_final_stats=1 corpus-http $(CURDIR)/tests/fuzz/corpus/http
	rm -rf $(FUZZ_BUILD)/corpus-kafka && mkdir -p $(FUZZ_BUILD)/corpus-kafka
	cd $(FUZZ_BUILD) && export LOOM_FUZZ_PG_DIR=$(FUZZ_PG_DIR); \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ./tests/fuzz/fuzz_kafka -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=30 \
	  -rss_limit_mb=2048 -print_final_stats=1 corpus-kafka $(CURDIR)/tests/fuzz/corpus/kafka; \
	  rc=$$?; LOOM_FUZZ_PG_STOP=1 ./tests/fuzz/fuzz_kafka -runs=0 >/dev/null 2>&1; exit $$rc

test: format-check check asan fuzz

format:
	clang-format -i $(SOURCES)

format-check:
	@clang-format --dry-run --Werror $(SOURCES) && echo "format-check: all C files formatted"

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
