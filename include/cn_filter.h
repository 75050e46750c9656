/*
 * cn_filter: Moray's LDAP filter language compiled to a parameterised SQL
 * WHERE clause. Values never enter the SQL text: they become $N parameters.
 *
 * Supported: (&...) (|...) (!...) (a=v) (a>=v) (a<=v) (a=*) presence,
 * (a=pre*), (a=*mid*), (a=*suf) substrings; RFC 4515 escapes (\2a etc).
 * Attributes must be indexed fields of the bucket (or _key, _id, _mtime);
 * anything else is an error (no silent full scans on unindexed data).
 */
#ifndef CN_FILTER_H
#define CN_FILTER_H

#include "cn_moray.h"

typedef struct {
    char *sql;                /* e.g. "(setup = $1::boolean AND hostname LIKE $2)" */
    char **params;            /* nparams NUL-terminated strings */
    int nparams;
} cn_sqlwhere_t;

/* Compile filter against the bucket's indexes; first_param is the number of
 * the first $N to use. 0 on success, -1 with err filled. */
int cn_filter_to_sql (const char *filter, const cn_mindex_t *index, size_t nindex,
                      int first_param, cn_sqlwhere_t *out, char *err, size_t errlen);
void cn_sqlwhere_fini (cn_sqlwhere_t *w);

/* Escape a value for use inside a filter (RFC 4515); caller frees. */
char *cn_filter_escape (const char *value);

#endif
