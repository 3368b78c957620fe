/*
 * The console (docs/console.md): static files built into the engine library
 * (console/CMakeLists.txt) and served by every gateway at /console.
 */
#ifndef LOOM_CONSOLE_H
#define LOOM_CONSOLE_H

#include "loom/http.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct loom_console_file {
    const char *name;         /* "console.js" */
    const char *content_type; /* "text/javascript; charset=utf-8" */
    const char *data;
    size_t len;
} loom_console_file_t;

/* Every file, then an entry with name NULL. */
extern const loom_console_file_t loom_console_files[];

/* The Content-Security-Policy of every console answer: the page's own
 * scripts, styles and API calls only; no inline script or style, no other
 * origin, no frames, no forms, no plugins. */
#define LOOM_CONSOLE_CSP                                                              \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " \
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

/* True for /console and /console/...: the gateway serves those itself. */
bool loom_console_path(const char *path);
/* Answers GET/HEAD of a console path: the file (index.html for /console and
 * /console/), 404 for an unknown file, 405 for another method. No token:
 * the files hold no data; the page asks for one and sends it to the API. */
void loom_console_serve(loom_http_req_t *req, loom_http_res_t *res);

#endif
