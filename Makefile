# agentgate — one entry point: make, make test, make run, make demo, make bench, make install.
# BPF objects: <hook>.bpf.c → build/bpf/<hook>.bpf.o → linked build/agentgate.bpf.o → skeleton.
# Userspace: userspace/*.c → build/libagentgate.a, shared by agentgated, agctl and the selftests.

OUTPUT ?= build
CLANG ?= clang
BPFTOOL ?= bpftool
PROTOC_C ?= protoc-c
CC ?= gcc
PREFIX ?= /usr/local
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')

ifeq ($(V),1)
Q =
msg =
else
Q = @
msg = @printf '  %-8s %s\n' "$(1)" "$(2)";
endif

PKGS := libbpf libelf zlib yaml-0.1 libprotobuf-c libnl-3.0 libnl-idiag-3.0 libnl-route-3.0 openssl \
	libpq libdeflate
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS = $(shell pkg-config --libs $(PKGS) 2>/dev/null)

VERSION := $(shell git describe --always --dirty 2>/dev/null || echo 0.1)
CFLAGS ?= -O2 -g
WARNFLAGS := -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers \
	     -Wshadow -Wformat=2 -Wno-format-nonliteral -Wno-format-truncation
ALL_CFLAGS := -std=gnu11 $(CFLAGS) $(WARNFLAGS) -D_GNU_SOURCE -pthread \
	      -I$(OUTPUT) -I$(OUTPUT)/gen -Iuserspace -Ibpf/include $(PKG_CFLAGS) \
	      -DAG_VERSION='"$(VERSION)"' -MMD -MP
LDLIBS := $(PKG_LIBS) -lpg_query -lhttp_parser -lyajl -lpthread

BPF_CFLAGS := -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
	      -I$(OUTPUT) -Ibpf -Ibpf/include

BPF_SRCS := $(sort $(wildcard bpf/*.bpf.c))
BPF_OBJS := $(patsubst bpf/%.bpf.c,$(OUTPUT)/bpf/%.bpf.o,$(BPF_SRCS))
PROTOS := $(wildcard userspace/*.proto)
PROTO_SRCS := $(patsubst userspace/%.proto,$(OUTPUT)/gen/%.pb-c.c,$(PROTOS))
PROTO_HDRS := $(PROTO_SRCS:.c=.h)
LIB_SRCS := $(filter-out userspace/agentgated.c,$(sort $(wildcard userspace/*.c userspace/*/*.c)))
LIB_OBJS := $(patsubst %.c,$(OUTPUT)/obj/%.o,$(LIB_SRCS)) \
	    $(patsubst $(OUTPUT)/gen/%.c,$(OUTPUT)/obj/gen/%.o,$(PROTO_SRCS))
AGCTL_SRCS := $(sort $(wildcard tools/agctl/*.c))
AGCTL_OBJS := $(patsubst %.c,$(OUTPUT)/obj/%.o,$(AGCTL_SRCS))
TEST_SRCS := $(sort $(wildcard selftests/*.c selftests/prog_tests/*.c))
TEST_OBJS := $(patsubst %.c,$(OUTPUT)/obj/%.o,$(TEST_SRCS))
TEST_DEFS := $(sort $(wildcard selftests/prog_tests/*.c))
BENCH_SRCS := $(sort $(wildcard scripts/bench/*.c))
BENCH_OBJS := $(patsubst %.c,$(OUTPUT)/obj/%.o,$(BENCH_SRCS))
SKEL := $(OUTPUT)/agentgate.skel.h
GEN_HDRS := $(SKEL) $(PROTO_HDRS) $(OUTPUT)/tests.h

BINS := $(OUTPUT)/agentgated $(OUTPUT)/agctl $(OUTPUT)/test_progs $(if $(BENCH_SRCS),$(OUTPUT)/agbench)

.DELETE_ON_ERROR:
.PHONY: all deps test run demo bench install uninstall clean format

all: $(BINS)

deps:
	$(Q)./scripts/install-deps.sh

$(OUTPUT) $(OUTPUT)/bpf $(OUTPUT)/gen:
	$(Q)mkdir -p $@

$(OUTPUT)/vmlinux.h: vmlinux.h.gen | $(OUTPUT)
	$(call msg,GEN,$@)
	$(Q)BPFTOOL=$(BPFTOOL) ./vmlinux.h.gen $@

$(OUTPUT)/bpf/%.bpf.o: bpf/%.bpf.c $(OUTPUT)/vmlinux.h $(wildcard bpf/lib/*.h bpf/include/*.h) | $(OUTPUT)/bpf
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

$(OUTPUT)/agentgate.bpf.o: $(BPF_OBJS)
	$(call msg,LINK,$@)
	$(Q)$(BPFTOOL) gen object $@ $^

$(SKEL): $(OUTPUT)/agentgate.bpf.o
	$(call msg,SKEL,$@)
	$(Q)$(BPFTOOL) gen skeleton $< name agentgate_bpf > $@

$(OUTPUT)/gen/%.pb-c.c $(OUTPUT)/gen/%.pb-c.h: userspace/%.proto | $(OUTPUT)/gen
	$(call msg,PROTO,$<)
	$(Q)$(PROTOC_C) --proto_path=userspace --c_out=$(OUTPUT)/gen $<

# The test list is generated from the test_<name>() definitions, never edited by hand.
$(OUTPUT)/tests.h: $(TEST_DEFS) | $(OUTPUT)
	$(call msg,GEN,$@)
	$(Q)grep -ho '^void test_[a-z0-9_]*(void)' $(TEST_DEFS) /dev/null | \
		sed -e 's/^void test_\(.*\)(void)/DEFINE_TEST(\1)/' > $@.tmp && \
		if cmp -s $@.tmp $@; then rm $@.tmp; touch $@; else mv $@.tmp $@; fi

$(OUTPUT)/obj/gen/%.o: $(OUTPUT)/gen/%.c
	@mkdir -p $(dir $@)
	$(call msg,CC,$<)
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-shadow -c $< -o $@

$(OUTPUT)/obj/%.o: %.c | $(GEN_HDRS)
	@mkdir -p $(dir $@)
	$(call msg,CC,$<)
	$(Q)$(CC) $(ALL_CFLAGS) -c $< -o $@

$(OUTPUT)/libagentgate.a: $(LIB_OBJS)
	$(call msg,AR,$@)
	$(Q)rm -f $@ && ar rcs $@ $^

$(OUTPUT)/agentgated: $(OUTPUT)/obj/userspace/agentgated.o $(OUTPUT)/libagentgate.a
	$(call msg,LD,$@)
	$(Q)$(CC) $(ALL_CFLAGS) $^ $(LDLIBS) -o $@

$(OUTPUT)/agctl: $(AGCTL_OBJS) $(OUTPUT)/libagentgate.a
	$(call msg,LD,$@)
	$(Q)$(CC) $(ALL_CFLAGS) $^ $(LDLIBS) -o $@

$(OUTPUT)/test_progs: $(TEST_OBJS) $(OUTPUT)/libagentgate.a
	$(call msg,LD,$@)
	$(Q)$(CC) $(ALL_CFLAGS) $^ $(LDLIBS) -o $@

$(OUTPUT)/agbench: $(BENCH_OBJS) $(OUTPUT)/libagentgate.a
	$(call msg,LD,$@)
	$(Q)$(CC) $(ALL_CFLAGS) $^ $(LDLIBS) -o $@

test: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)./selftests/run.sh

run: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(OUTPUT)/agentgated --foreground --config policies/default.yaml

demo: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)./scripts/demo.sh

# All run even if one misses its targets; the exit status says whether any failed.
bench: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)rc=0; ./scripts/bench.sh || rc=1; ./scripts/bench_pg.sh || rc=1; \
		./scripts/bench_http.sh || rc=1; exit $$rc

install: all
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share/man/man8 \
		$(DESTDIR)/usr/share/bash-completion/completions $(DESTDIR)/etc/agentgate
	install -m 0755 $(OUTPUT)/agentgated $(OUTPUT)/agctl $(DESTDIR)$(PREFIX)/sbin/
	install -m 0644 tools/man/*.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -m 0644 tools/bash-completion/agctl $(DESTDIR)/usr/share/bash-completion/completions/agctl
	[ -e $(DESTDIR)/etc/agentgate/policy.yaml ] || \
		install -m 0600 policies/default.yaml $(DESTDIR)/etc/agentgate/policy.yaml

uninstall:
	-$(DESTDIR)$(PREFIX)/sbin/agctl prog detach
	rm -f $(DESTDIR)$(PREFIX)/sbin/agentgated $(DESTDIR)$(PREFIX)/sbin/agctl \
		$(DESTDIR)/usr/share/bash-completion/completions/agctl
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/share/man/man8/,$(notdir $(wildcard tools/man/*.8)))

format:
	clang-format -i $(BPF_SRCS) bpf/lib/*.h bpf/include/*.h userspace/*.[ch] tools/agctl/*.[ch] selftests/*.[ch]

clean:
	rm -rf $(OUTPUT)

-include $(shell find $(OUTPUT)/obj -name '*.d' 2>/dev/null)
