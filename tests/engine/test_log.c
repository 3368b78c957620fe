/* Logging: levels, logfmt text and JSON lines with key=value fields. */
#include "loom/log.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static char *capture(loom_log_format_t format, loom_log_level_t level, void (*fn)(void))
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    loom_log_set_stream(f);
    loom_log_setup(level, format);
    fn();
    fflush(f);
    loom_log_set_stream(NULL);
    fclose(f);
    return buf;
}

static void emit_all(void)
{
    LOOM_DEBUG("debug line", "k=1");
    LOOM_INFO("could not connect", "error=connection refused by host attempt=3 topic=loom.cmd.x");
    LOOM_WARN("no fields");
    LOOM_ERROR("quote \"me\"", "path=/a b=c");
}

Test(log, text_lines_are_logfmt_with_quoted_values)
{
    loom_log_set_node("n1");
    char *out = capture(LOOM_LOG_TEXT, LOOM_LOG_INFO, emit_all);
    cr_assert_null(strstr(out, "debug line"), "below the level: %s", out);
    cr_assert(strstr(out, "level=info node=n1 msg=\"could not connect\" "
                          "error=\"connection refused by host\" attempt=3 topic=loom.cmd.x\n"),
              "%s", out);
    cr_assert(strstr(out, "level=warn node=n1 msg=\"no fields\"\n"), "%s", out);
    cr_assert(strstr(out, "msg=\"quote \\\"me\\\"\" path=/a b=c\n"), "%s", out);
    int lines = 0;
    for (char *p = out; *p; p++)
        lines += *p == '\n';
    cr_assert_eq(lines, 3);
    free(out);
    loom_log_set_node(NULL);
}

Test(log, json_lines_parse_and_carry_fields)
{
    char *out = capture(LOOM_LOG_JSON, LOOM_LOG_DEBUG, emit_all);
    int n = 0;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n"), n++) {
        json_error_t jerr;
        json_t *o = json_loads(line, 0, &jerr);
        cr_assert_not_null(o, "not JSON: %s (%s)", line, jerr.text);
        cr_assert_not_null(json_object_get(o, "ts"));
        cr_assert_not_null(json_object_get(o, "level"));
        if (n == 1) {
            cr_assert_str_eq(json_string_value(json_object_get(o, "msg")), "could not connect");
            cr_assert_str_eq(json_string_value(json_object_get(o, "error")),
                             "connection refused by host");
            cr_assert_str_eq(json_string_value(json_object_get(o, "attempt")), "3");
        }
        if (n == 3)
            cr_assert_str_eq(json_string_value(json_object_get(o, "msg")), "quote \"me\"");
        json_decref(o);
    }
    cr_assert_eq(n, 4);
    free(out);
}

Test(log, level_and_format_names_parse)
{
    loom_log_level_t l;
    loom_log_format_t f;
    cr_assert_eq(loom_log_level_parse("warn", &l), 0);
    cr_assert_eq(l, LOOM_LOG_WARN);
    cr_assert_neq(loom_log_level_parse("verbose", &l), 0);
    cr_assert_eq(loom_log_format_parse("json", &f), 0);
    cr_assert_eq(f, LOOM_LOG_JSON);
    cr_assert_neq(loom_log_format_parse("xml", &f), 0);
}

/* Bytes from Kafka or HTTP end up in log values: every byte value, broken
 * UTF-8 and values far over the line size. */
Test(log, hostile_bytes_leave_json_lines_valid_and_text_lines_escaped)
{
    char all[256 * 3 + 1];
    size_t n = 0;
    for (int c = 1; c < 256; c++) { /* every byte but NUL, some twice */
        all[n++] = (char)c;
        if (c % 3 == 0)
            all[n++] = (char)(0x80 | (c & 0x3f));
    }
    all[n] = '\0';
    const char *values[] = {all,
                            "a\xff"
                            "b",
                            "\xc3",
                            "caf\xc3\xa9",
                            "\xed\xa0\x80 x=1 y",
                            "\xf4\x90\x80\x80"};
    char big[6000];
    memset(big, 0xff, sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]) + 1; i++) {
        const char *v = i < sizeof(values) / sizeof(values[0]) ? values[i] : big;
        char fields[7000], line[8192];
        snprintf(fields, sizeof(fields), "message_id=%s consumer=c", v);
        int len = loom_log_format_line(line, sizeof(line), LOOM_LOG_JSON, LOOM_LOG_WARN,
                                       "command rejected", fields);
        json_error_t jerr;
        json_t *o = json_loadb(line, (size_t)len, 0, &jerr);
        cr_assert_not_null(o, "value %zu: not JSON (%s): %s", i, jerr.text, line);
        cr_assert_str_eq(json_string_value(json_object_get(o, "msg")), "command rejected");
        json_decref(o);
        /* Text: nothing but printable ASCII, space and valid UTF-8. */
        len = loom_log_format_line(line, sizeof(line), LOOM_LOG_TEXT, LOOM_LOG_WARN,
                                   "command rejected", fields);
        cr_assert(loom_text_valid(line, (size_t)len), "value %zu: %s", i, line);
        for (int k = 0; k < len; k++)
            cr_assert((unsigned char)line[k] >= 0x20 && line[k] != 0x7f, "value %zu: byte %d", i,
                      k);
    }
}

Test(log, text_escape_keeps_utf8_and_marks_other_bytes)
{
    char *s = loom_text_escape("a\xff\0b\xc3\xa9", 6, 0);
    cr_assert_str_eq(s, "a\\xff\\x00b\xc3\xa9");
    free(s);
    s = loom_text_escape("abcdefghijklmnop", 16, 10);
    cr_assert_str_eq(s, "abcdefg...");
    free(s);
    cr_assert(loom_text_valid("caf\xc3\xa9", 5));
    cr_assert_not(loom_text_valid("a\0b", 3));
    cr_assert_not(loom_text_valid("\xc0\xaf", 2));         /* overlong */
    cr_assert_not(loom_text_valid("\xed\xa0\x80", 3));     /* surrogate */
    cr_assert_not(loom_text_valid("\xf4\x90\x80\x80", 4)); /* over U+10FFFF */
    cr_assert_not(loom_text_valid("\xe2\x82", 2));         /* cut */
}
