/*
 * console.c: serving the console's files (loom/console.h). The files are
 * compiled in, so an answer is a table lookup; each carries the strict
 * Content-Security-Policy and headers that keep the browser from guessing
 * types, framing the page or sending the address elsewhere.
 */
#include "loom/console.h"

#include <string.h>

bool loom_console_path(const char *path)
{
    return strncmp(path, "/console", 8) == 0 && (path[8] == '\0' || path[8] == '/');
}

static void headers(loom_http_res_t *res)
{
    loom_http_res_header(res, "Content-Security-Policy", LOOM_CONSOLE_CSP);
    loom_http_res_header(res, "X-Content-Type-Options", "nosniff");
    loom_http_res_header(res, "X-Frame-Options", "DENY");
    loom_http_res_header(res, "Referrer-Policy", "no-referrer");
    loom_http_res_header(res, "Cache-Control", "no-cache");
}

static void plain(loom_http_res_t *res, int status, const char *text)
{
    loom_http_res_status(res, status);
    headers(res);
    loom_http_res_header(res, "Content-Type", "text/plain; charset=utf-8");
    loom_http_res_body(res, text, strlen(text));
    loom_http_res_send(res);
}

void loom_console_serve(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *method = loom_http_req_method(req);
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        loom_http_res_header(res, "Allow", "GET, HEAD");
        plain(res, 405, "the console takes GET or HEAD\n");
        return;
    }
    const char *path = loom_http_req_path(req);
    const char *name = path[8] == '/' ? path + 9 : "";
    if (!*name)
        name = "index.html";
    for (const loom_console_file_t *f = loom_console_files; f->name; f++) {
        if (strcmp(f->name, name) == 0) {
            loom_http_res_status(res, 200);
            headers(res);
            loom_http_res_header(res, "Content-Type", f->content_type);
            loom_http_res_body(res, f->data, f->len);
            loom_http_res_send(res);
            return;
        }
    }
    plain(res, 404, "no such console file\n");
}
