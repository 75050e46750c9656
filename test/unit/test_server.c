/*
 * test_server: the server record (cn_server.h): sysinfo checks, the
 * sysinfo -> record mapping, ordering, freshness, duplicate UUIDs, GET
 * /servers parameters, the API views and POST /servers/:uuid.
 */
#include <stdlib.h>
#include <string.h>

#include "cn_server.h"
#include "cn_msg.h"
#include "cn_params.h"
#include "cn_test.h"

/* A compute node's sysinfo, shaped like SmartOS's /usr/bin/sysinfo output
 * (values invented). The UUID is upper case on purpose: SMBIOS UUIDs often
 * are, and the record must use the lower-case form. */
static const char *FIXTURE =
    "{\n"
    "  \"Live Image\": \"20240606T000431Z\",\n"
    "  \"System Type\": \"SunOS\",\n"
    "  \"Boot Time\": \"1718000000\",\n"
    "  \"Datacenter Name\": \"eu-west-7\",\n"
    "  \"SDC Version\": \"7.0\",\n"
    "  \"Manufacturer\": \"Supermicro\",\n"
    "  \"Product\": \"SYS-1029P-WTR\",\n"
    "  \"Serial Number\": \"S31415926535\",\n"
    "  \"SKU Number\": \"To be filled by O.E.M.\",\n"
    "  \"HW Version\": \"0123456789\",\n"
    "  \"HW Family\": \"To be filled by O.E.M.\",\n"
    "  \"Setup\": \"true\",\n"
    "  \"VM Capable\": true,\n"
    "  \"Bhyve Capable\": true,\n"
    "  \"Bhyve Max Vcpus\": 48,\n"
    "  \"HVM API\": true,\n"
    "  \"CPU Type\": \"Intel(R) Xeon(R) Silver 4214 CPU @ 2.20GHz\",\n"
    "  \"CPU Virtualization\": \"vmx\",\n"
    "  \"CPU Physical Cores\": 2,\n"
    "  \"Admin NIC Tag\": \"admin\",\n"
    "  \"UUID\": \"44454C4C-3900-1046-8033-B2C04F4B4E32\",\n"
    "  \"Hostname\": \"cn-r12-07\",\n"
    "  \"CPU Total Cores\": 48,\n"
    "  \"MiB of Memory\": \"196511\",\n"
    "  \"Zpool\": \"zones\",\n"
    "  \"Zpool Disks\": \"c1t0d0,c1t1d0,c1t2d0,c1t3d0\",\n"
    "  \"Zpool Profile\": \"raidz2\",\n"
    "  \"Zpool Creation\": 1650000000,\n"
    "  \"Zpool Size in GiB\": 3456,\n"
    "  \"Disks\": {\n"
    "    \"c1t0d0\": { \"Size in GB\": 1920 },\n"
    "    \"c1t1d0\": { \"Size in GB\": 1920 },\n"
    "    \"c1t2d0\": { \"Size in GB\": 1920 },\n"
    "    \"c1t3d0\": { \"Size in GB\": 1920 },\n"
    "    \"c2t0d0\": { \"Size in GB\": 32 }\n"
    "  },\n"
    "  \"Boot Parameters\": {\n"
    "    \"rabbitmq\": \"guest:guest:10.66.0.20:5672\",\n"
    "    \"rabbitmq_dns\": \"guest:guest:rabbitmq.eu-west-7.example.net:5672\",\n"
    "    \"admin_nic\": \"ac:1f:6b:8e:10:02\",\n"
    "    \"console\": \"ttyb\",\n"
    "    \"ttyb-mode\": \"115200,8,n,1,-\",\n"
    "    \"smt_enabled\": \"true\",\n"
    "    \"boot_args\": \"\",\n"
    "    \"bootargs\": \"\"\n"
    "  },\n"
    "  \"SDC Agents\": [\n"
    "    { \"name\": \"cn-agent\", \"version\": \"2.14.1\" },\n"
    "    { \"name\": \"config-agent\", \"version\": \"1.9.0\" },\n"
    "    { \"name\": \"net-agent\", \"version\": \"2.3.0\" },\n"
    "    { \"name\": \"vm-agent\", \"version\": \"1.10.2\" },\n"
    "    { \"name\": \"amon-agent\", \"version\": \"1.0.1\" },\n"
    "    { \"name\": \"amon-relay\", \"version\": \"1.0.1\" },\n"
    "    { \"name\": \"cmon-agent\", \"version\": \"1.18.0\" },\n"
    "    { \"name\": \"firewaller\", \"version\": \"1.6.2\" },\n"
    "    { \"name\": \"smartlogin\", \"version\": \"0.2.1\" }\n"
    "  ],\n"
    "  \"Network Interfaces\": {\n"
    "    \"ixgbe0\": {\n"
    "      \"MAC Address\": \"AC:1F:6B:8E:10:00\",\n"
    "      \"ip4addr\": \"\",\n"
    "      \"Link Status\": \"up\",\n"
    "      \"NIC Names\": [ \"external\" ]\n"
    "    },\n"
    "    \"ixgbe1\": {\n"
    "      \"MAC Address\": \"ac:1f:6b:8e:10:01\",\n"
    "      \"ip4addr\": \"\",\n"
    "      \"Link Status\": \"down\",\n"
    "      \"NIC Names\": []\n"
    "    },\n"
    "    \"igb0\": {\n"
    "      \"MAC Address\": \"ac:1f:6b:8e:10:02\",\n"
    "      \"ip4addr\": \"10.66.0.37\",\n"
    "      \"Link Status\": \"up\",\n"
    "      \"NIC Names\": [ \"admin\" ]\n"
    "    },\n"
    "    \"igb1\": {\n"
    "      \"MAC Address\": \"ac:1f:6b:8e:10:03\",\n"
    "      \"ip4addr\": \"\",\n"
    "      \"Link Status\": \"down\",\n"
    "      \"NIC Names\": []\n"
    "    }\n"
    "  },\n"
    "  \"Virtual Network Interfaces\": {\n"
    "    \"manta0\": {\n"
    "      \"MAC Address\": \"90:b8:d0:4d:1c:7e\",\n"
    "      \"ip4addr\": \"172.27.10.37\",\n"
    "      \"Link Status\": \"up\",\n"
    "      \"Host Interface\": \"ixgbe0\",\n"
    "      \"VLAN\": \"3105\"\n"
    "    }\n"
    "  },\n"
    "  \"Link Aggregations\": {\n"
    "    \"aggr0\": {\n"
    "      \"LACP mode\": \"active\",\n"
    "      \"Interfaces\": [ \"ixgbe0\", \"ixgbe1\" ]\n"
    "    }\n"
    "  }\n"
    "}\n";

#define UUID_LC "44454c4c-3900-1046-8033-b2c04f4b4e32"
#define T0 1718000100000LL          /* a receipt time after the boot */
#define FRESH 90                    /* freshness window, seconds */

/* The fixture with modifications: mods is a JSON object whose keys replace
 * (or, with value null, remove) the fixture's; a parsed sysinfo. */
static json_t *
s_sysinfo (const char *mods)
{
    json_t *si = json_loads (FIXTURE, 0, NULL);
    if (mods) {
        json_t *m = json_loads (mods, 0, NULL);
        const char *k;
        json_t *v;
        json_object_foreach (m, k, v) {
            if (json_is_null (v))
                json_object_del (si, k);
            else
                json_object_set (si, k, v);
        }
        json_decref (m);
    }
    char *text = json_dumps (si, 0);
    json_decref (si);
    char err[256] = "";
    json_t *out = NULL;
    int rc = cn_sysinfo_parse (text, strlen (text), NULL, &out, err, sizeof err);
    if (rc != 0)
        printf ("  fixture rejected: %s\n", err);
    free (text);
    return out;
}

static cn_sysinfo_ctx_t
s_ctx (int64_t now)
{
    cn_sysinfo_ctx_t c = { .datacenter = "eu-west-7", .now_ms = now, .sent_ms = 0,
                           .freshness_s = FRESH };
    return c;
}

/* A new server's record at time T0. */
static json_t *
s_new_record (void)
{
    json_t *si = s_sysinfo (NULL);
    cn_sysinfo_ctx_t c = s_ctx (T0);
    json_t *rec = NULL;
    cn_srv_result_t r = cn_server_apply_sysinfo (NULL, si, &c, &rec);
    CHECK_INT (r, CN_SRV_WRITE);
    json_decref (si);
    return rec;
}

static const char *
s_get_str (const json_t *o, const char *k)
{
    return json_string_value (json_object_get (o, k));
}

static long long
s_get_int (const json_t *o, const char *k)
{
    return (long long) json_integer_value (json_object_get (o, k));
}

/* Parse a bad sysinfo; return the error text (static). */
static const char *
s_bad (const char *text, const char *expect_uuid)
{
    static char err[256];
    json_t *out = (json_t *) 1;
    err[0] = '\0';
    int rc = cn_sysinfo_parse (text, strlen (text), expect_uuid, &out, err, sizeof err);
    CHECK_INT (rc, -1);
    CHECK (out == NULL);
    return err;
}

/* The fixture with one key replaced, as text (for the parse-error tests). */
static char *
s_fixture_with (const char *key, const char *json_value)
{
    json_t *si = json_loads (FIXTURE, 0, NULL);
    json_t *v = json_loads (json_value, JSON_DECODE_ANY, NULL);
    json_object_set_new (si, key, v);
    char *text = json_dumps (si, 0);
    json_decref (si);
    return text;
}

/* ---- tests ---- */

static void
test_index (void)
{
    CHECK_INT (cn_server_nindex, 8);
    bool seen_uuid = false;
    for (size_t i = 0; i < cn_server_nindex; i++) {
        const cn_mindex_t *x = &cn_server_index[i];
        if (strcmp (x->name, "uuid") == 0) {
            seen_uuid = true;
            CHECK (x->unique);
            CHECK_INT (x->type, CN_MIDX_STRING);
        }
        else
            CHECK (!x->unique);
        if (!strcmp (x->name, "setup") || !strcmp (x->name, "headnode") ||
            !strcmp (x->name, "reserved") || !strcmp (x->name, "reservoir"))
            CHECK_INT (x->type, CN_MIDX_BOOLEAN);
        if (!strcmp (x->name, "hostname") || !strcmp (x->name, "datacenter") ||
            !strcmp (x->name, "overprovision_ratios"))
            CHECK_INT (x->type, CN_MIDX_STRING);
    }
    CHECK (seen_uuid);
}

static void
test_apierr (void)
{
    cn_apierr_t e = { 0 };
    cn_apierr_set (&e, 404, "ResourceNotFound", "Server %s not found", UUID_LC);
    char *body = cn_apierr_body (&e);
    CHECK_STR (body, "{\"code\":\"ResourceNotFound\",\"message\":\"Server " UUID_LC
                     " not found\"}");
    free (body);
    e.errors = json_pack ("[{s:s,s:s,s:s}]", "field", "x", "code", "Invalid", "message", "m");
    body = cn_apierr_body (&e);
    CHECK (strstr (body, "\"errors\":[{") != NULL);
    free (body);
    cn_apierr_fini (&e);
    CHECK (e.errors == NULL);
    cn_apierr_fini (&e);        /* idempotent */
}

static void
test_parse_ok (void)
{
    char err[256] = "";
    json_t *si = NULL;
    CHECK (strlen (FIXTURE) > 2800);
    /* expect_uuid compares case-insensitively */
    int rc = cn_sysinfo_parse (FIXTURE, strlen (FIXTURE), UUID_LC, &si, err, sizeof err);
    CHECK_INT (rc, 0);
    CHECK (json_is_object (si));
    json_decref (si);
    rc = cn_sysinfo_parse (FIXTURE, strlen (FIXTURE),
                           "44454C4C-3900-1046-8033-B2C04F4B4E32", &si, err, sizeof err);
    CHECK_INT (rc, 0);
    json_decref (si);
    /* Setup as a boolean, memory as a number, headnode as a boolean */
    si = s_sysinfo ("{\"Setup\": false, \"MiB of Memory\": 2048, "
                    "\"Boot Parameters\": {\"headnode\": true}, \"CN Agent Port\": \"5310\"}");
    CHECK (si != NULL);
    json_decref (si);
}

static void
test_parse_errors (void)
{
    CHECK_STR (s_bad ("", NULL), "sysinfo is empty");
    CHECK (strncmp (s_bad ("{nope", NULL), "sysinfo is not valid JSON: ", 27) == 0);
    char *half = strndup (FIXTURE, strlen (FIXTURE) / 2);
    CHECK (strncmp (s_bad (half, NULL), "sysinfo is not valid JSON: ", 27) == 0);
    free (half);
    CHECK (strstr (s_bad ("{\"UUID\":\"" UUID_LC "\",\"UUID\":\"" UUID_LC "\"}", NULL),
                   "duplicate") != NULL);
    CHECK_STR (s_bad ("[1, 2]", NULL), "sysinfo must be a JSON object");
    CHECK_STR (s_bad ("42", NULL), "sysinfo must be a JSON object");
    CHECK_STR (s_bad ("{\"Hostname\": \"x\"}", NULL), "sysinfo has no \"UUID\"");
    CHECK_STR (s_bad ("{\"UUID\": 7}", NULL), "sysinfo \"UUID\" must be a string");
    CHECK_STR (s_bad ("{\"UUID\": \"abc\"}", NULL),
               "sysinfo \"UUID\" is not a valid UUID: \"abc\"");
    CHECK_STR (s_bad (FIXTURE, "00000000-0000-0000-0000-000000000001"),
               "sysinfo \"UUID\" " UUID_LC
               " does not match the server UUID 00000000-0000-0000-0000-000000000001");

    static const struct {
        const char *key, *value, *msg;
    } cases[] = {
        { "Hostname", "5", "sysinfo \"Hostname\" must be a string" },
        { "Live Image", "[]", "sysinfo \"Live Image\" must be a string" },
        { "Setup", "\"maybe\"", "sysinfo \"Setup\" must be true, false, \"true\" or \"false\"" },
        { "MiB of Memory", "\"lots\"",
          "sysinfo \"MiB of Memory\" must be a non-negative integer or a string of one" },
        { "MiB of Memory", "-5",
          "sysinfo \"MiB of Memory\" must be a non-negative integer or a string of one" },
        { "Boot Time", "\"yesterday\"",
          "sysinfo \"Boot Time\" must be seconds since the epoch (an integer or a string of one)" },
        { "Zpool Creation", "1e300",
          "sysinfo \"Zpool Creation\" must be seconds since the epoch (an integer or a string of one)" },
        { "CN Agent Port", "70000", "sysinfo \"CN Agent Port\" must be a port number (1-65535)" },
        { "Admin IP", "false", "sysinfo \"Admin IP\" must be a string" },
        { "Boot Parameters", "\"x\"", "sysinfo \"Boot Parameters\" must be an object" },
        { "Boot Parameters", "{\"headnode\": 1}",
          "sysinfo \"Boot Parameters\".\"headnode\" must be a string or a boolean" },
        { "Network Interfaces", "[]", "sysinfo \"Network Interfaces\" must be an object" },
        { "Network Interfaces", "{\"e1000g0\": 3}",
          "sysinfo \"Network Interfaces\".\"e1000g0\" must be an object" },
        { "Network Interfaces", "{\"e1000g0\": {\"NIC Names\": \"admin\"}}",
          "sysinfo \"Network Interfaces\".\"e1000g0\".\"NIC Names\" must be an array of strings" },
        { "Network Interfaces", "{\"e1000g0\": {\"MAC Address\": 12}}",
          "sysinfo \"Network Interfaces\".\"e1000g0\".\"MAC Address\" must be a string" },
        { "Virtual Network Interfaces", "{\"v0\": {\"ip4addr\": null}}",
          "sysinfo \"Virtual Network Interfaces\".\"v0\".\"ip4addr\" must be a string" },
        { "SDC Agents", "{}", "sysinfo \"SDC Agents\" must be an array" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *text = s_fixture_with (cases[i].key, cases[i].value);
        const char *got = s_bad (text, NULL);
        if (strcmp (got, cases[i].msg) != 0)
            printf ("  case %zu (%s): got \"%s\"\n", i, cases[i].key, got);
        CHECK_STR (got, cases[i].msg);
        free (text);
    }

    /* too large: checked before parsing */
    size_t big = CN_SYSINFO_MAX_BYTES + 1;
    char *buf = malloc (big + 1);
    memset (buf, ' ', big);
    buf[0] = '{';
    buf[big - 1] = '}';
    buf[big] = '\0';
    CHECK_STR (s_bad (buf, NULL), "sysinfo is too large (4194305 bytes, the limit is 4194304)");
    free (buf);
}

/* cn_sysinfo_load gives the verdicts and messages of cn_sysinfo_parse, on
 * its fast scan and where it leaves the text to jansson. */
static void
test_sysinfo_load_verdicts (void)
{
    char *fx = s_fixture_with ("Hostname", "\"cn-1\"");
    char *esc = s_fixture_with ("Hostname", "\"cn-\\u00e9\\n\"");
    const char *texts[] = {
        FIXTURE, fx, esc, "", "{nope", "[1, 2]", "42", "{\"Hostname\": \"x\"}", "{\"UUID\": 7}",
        "{\"UUID\": \"abc\"}",
        "{\"UUID\":\"" UUID_LC "\",\"UUID\":\"" UUID_LC "\"}",
        "{\"UUID\":\"" UUID_LC "\",\"a\":{\"b\":1,\"b\":2}}",            /* nested duplicate */
        "{\"UUID\":\"" UUID_LC "\",\"a\":{\"b\":1},\"c\":{\"b\":2}}",   /* not a duplicate */
        "{\"UUID\":\"" UUID_LC "\",\"a\\u0062\":1,\"ab\":2}",            /* escaped key */
        "{\"UUID\":\"" UUID_LC "\",\"a\\u0062\":1,\"b\":2}",             /* left to jansson */
        "{\"UUID\":\"" UUID_LC "\",\"a\":\"x\\u0000y\"}",                /* NUL */
        "{\"UUID\":\"" UUID_LC "\",\"a\":99999999999999999999}",         /* too big */
        "{\"UUID\":\"" UUID_LC "\",\"a\":-9223372036854775808}",
        "{\"UUID\":\"" UUID_LC "\",\"a\":1e400}",                        /* overflow */
        "{\"UUID\":\"" UUID_LC "\",\"a\":1.5e-3,\"b\":[true,false,null,{}]}",
        "{\"UUID\":\"" UUID_LC "\",\"a\":\"\xff\"}",                     /* bad UTF-8 */
        "{\"UUID\":\"" UUID_LC "\",\"a\":01}",
        "{\"UUID\":\"" UUID_LC "\"} x",
        " {\"UUID\":\"" UUID_LC "\"}\n ",
        "{\"UUID\":\"" UUID_LC "\",\"Hostname\":5}",
        "{\"UUID\":\"" UUID_LC "\",\"Network Interfaces\":{\"e0\":{\"NIC Names\":\"a\"}}}",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        char e1[256] = "", e2[256] = "";
        json_t *tree = NULL;
        cn_sysinfo_t *si = NULL;
        size_t n = strlen (texts[i]);
        int r1 = cn_sysinfo_parse (texts[i], n, NULL, &tree, e1, sizeof e1);
        int r2 = cn_sysinfo_load (texts[i], n, NULL, &si, e2, sizeof e2);
        if (r1 != r2 || strcmp (e1, e2) != 0)
            printf ("  case %zu: parse %d \"%s\", load %d \"%s\"\n", i, r1, e1, r2, e2);
        CHECK_INT (r2, r1);
        CHECK_STR (e2, e1);
        CHECK ((si != NULL) == (r2 == 0));
        if (si) {
            CHECK_INT (si->len, n);
            CHECK (memcmp (si->text, texts[i], n) == 0);
            /* the summary: exactly the members records derive from */
            const char *k;
            json_t *v;
            json_object_foreach (si->summary, k, v)
                CHECK (json_equal (v, json_object_get (tree, k)));
            CHECK (json_object_get (si->summary, "UUID") != NULL);
            CHECK (json_object_get (si->summary, "Disks") == NULL);
            json_t *back = cn_sysinfo_tree (si);
            CHECK (json_equal (back, tree));
            json_decref (back);
        }
        cn_sysinfo_unref (&si);
        CHECK (si == NULL);
        json_decref (tree);
    }
    /* a text the fast scan leaves to jansson is kept, without a hash */
    const char *slow = "{\"UUID\":\"" UUID_LC "\",\"a\\u0062\":1}";
    cn_sysinfo_t *ss = NULL;
    char serr[256];
    CHECK_INT (cn_sysinfo_load (slow, strlen (slow), NULL, &ss, serr, sizeof serr), 0);
    CHECK (ss && !ss->hashed && json_object_size (ss->summary) == 1);
    cn_sysinfo_unref (&ss);
    /* the fixture itself takes the fast way */
    cn_sysinfo_t *si = NULL;
    char err[256];
    CHECK_INT (cn_sysinfo_load (FIXTURE, strlen (FIXTURE), UUID_LC, &si, err, sizeof err), 0);
    CHECK (si && si->hashed);
    /* the 17 members records derive from but "CN Agent IP", "CN Agent Port" and
     * "Admin IP", which the fixture lacks */
    CHECK_INT (json_object_size (si->summary), 14);
    cn_sysinfo_unref (&si);
    free (fx);
    free (esc);
}

/* Loading like the previous sysinfo shares the members that did not change. */
static void
test_sysinfo_load_like (void)
{
    char err[256];
    cn_sysinfo_t *a = NULL, *b = NULL, *plain = NULL, *c = NULL;
    char *fx = s_fixture_with ("Hostname", "\"cn-2\"");
    CHECK_INT (cn_sysinfo_load (FIXTURE, strlen (FIXTURE), UUID_LC, &a, err, sizeof err), 0);
    CHECK_INT (cn_sysinfo_load_like (fx, strlen (fx), UUID_LC, a, &b, err, sizeof err), 0);
    CHECK_INT (cn_sysinfo_load (fx, strlen (fx), UUID_LC, &plain, err, sizeof err), 0);
    CHECK (json_equal (b->summary, plain->summary));
    CHECK (!json_equal (a->summary, b->summary));
    CHECK_STR (json_string_value (json_object_get (b->summary, "Hostname")), "cn-2");
    /* a string member written the same is shared, a changed one is not */
    CHECK (json_object_get (b->summary, "UUID") == json_object_get (a->summary, "UUID"));
    CHECK (json_object_get (b->summary, "Hostname") != json_object_get (a->summary, "Hostname"));
    /* the same layout: the unchanged members are a's own */
    CHECK_INT (cn_sysinfo_load_like (fx, strlen (fx), UUID_LC, plain, &c, err, sizeof err), 0);
    CHECK (json_object_get (c->summary, "Network Interfaces")
           == json_object_get (plain->summary, "Network Interfaces"));
    CHECK (json_equal (c->summary, plain->summary));
    /* a rejected text is rejected as without like */
    cn_sysinfo_t *bad = NULL;
    CHECK_INT (cn_sysinfo_load_like (FIXTURE, strlen (FIXTURE), "00000000-0000-0000-0000-000000000001",
                                     a, &bad, err, sizeof err), -1);
    CHECK (bad == NULL);
    cn_sysinfo_unref (&a);
    cn_sysinfo_unref (&b);
    cn_sysinfo_unref (&c);
    CHECK_STR (json_string_value (json_object_get (plain->summary, "Hostname")), "cn-2");
    cn_sysinfo_unref (&plain);
    free (fx);
}

/* Equal JSON, equal hash: member order, whitespace, escapes do not count. */
static void
test_sysinfo_equal (void)
{
    static const struct {
        const char *a, *b;
        bool equal;
    } cases[] = {
        { "{\"a\":1,\"b\":[1,2]}", "{ \"b\" : [ 1 , 2 ] , \"a\" : 1 }", true },
        { "{\"a\":\"\\u00e9\\/\"}", "{\"a\":\"\xc3\xa9/\"}", true },
        { "{\"a\":{\"x\":1,\"y\":2}}", "{\"a\":{\"y\":2,\"x\":1}}", true },
        { "{\"a\":-0}", "{\"a\":0}", true },
        { "{\"a\":1.0}", "{\"a\":1.00}", true },          /* reals: by parsing */
        { "{\"a\":1}", "{\"a\":1.0}", false },            /* integer vs real */
        { "{\"a\":[1,2]}", "{\"a\":[2,1]}", false },
        { "{\"a\":1,\"b\":2}", "{\"a\":2,\"b\":1}", false },
        { "{\"a\":{\"b\":1}}", "{\"a\":{\"b\":1},\"c\":{}}", false },
        { "{\"a\":\"1\"}", "{\"a\":1}", false },
        { "{\"a\":null}", "{}", false },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *x = json_loads (cases[i].a, 0, NULL), *y = json_loads (cases[i].b, 0, NULL);
        CHECK (x && y);
        CHECK (json_equal (x, y) == cases[i].equal);
        uint64_t ha = 0, hb = 0;
        CHECK (cn_sysinfo_hash_text (cases[i].a, strlen (cases[i].a), &ha));
        CHECK (cn_sysinfo_hash_text (cases[i].b, strlen (cases[i].b), &hb));
        if (cases[i].equal)
            CHECK (ha == hb);
        cn_sysinfo_t *sa = cn_sysinfo_from_json (x), *sb = cn_sysinfo_from_json (y);
        CHECK (cn_sysinfo_equal (sa, sb) == cases[i].equal);
        if (cn_sysinfo_equal (sa, sb) != cases[i].equal)
            printf ("  case %zu: %s vs %s\n", i, cases[i].a, cases[i].b);
        CHECK (cn_sysinfo_equal (sa, sa));
        CHECK (!cn_sysinfo_equal (sa, NULL));
        CHECK (cn_sysinfo_equal (NULL, NULL));
        cn_sysinfo_unref (&sa);
        cn_sysinfo_unref (&sb);
        json_decref (x);
        json_decref (y);
    }
    /* the same document loaded and re-serialised */
    cn_sysinfo_t *a = NULL;
    char err[256];
    CHECK_INT (cn_sysinfo_load (FIXTURE, strlen (FIXTURE), NULL, &a, err, sizeof err), 0);
    json_t *t = cn_sysinfo_tree (a);
    cn_sysinfo_t *b = cn_sysinfo_from_json (t);
    CHECK (a->hashed && b->hashed && a->hash == b->hash);
    CHECK (cn_sysinfo_equal (a, b));
    cn_sysinfo_t *a2 = cn_sysinfo_ref (a);
    CHECK (a2 == a);
    CHECK_INT (a->refs, 2);
    cn_sysinfo_unref (&a2);
    CHECK (a2 == NULL);
    CHECK_INT (a->refs, 1);
    cn_sysinfo_unref (&a);
    cn_sysinfo_unref (&b);
    json_decref (t);
    /* no text is no hash */
    uint64_t h;
    CHECK (!cn_sysinfo_hash_text ("{\"a\":", 5, &h));
    CHECK (!cn_sysinfo_hash_text (NULL, 0, &h));
}

/* The writer's way (record and sysinfo apart) gives what the joined way does. */
static void
test_apply_sysinfo_si (void)
{
    char err[256];
    cn_sysinfo_t *si = NULL, *si2 = NULL, *other = NULL;
    CHECK_INT (cn_sysinfo_load (FIXTURE, strlen (FIXTURE), UUID_LC, &si, err, sizeof err), 0);
    /* the same document, members reordered: unchanged */
    json_t *t = json_loads (FIXTURE, 0, NULL);
    char *sorted = json_dumps (t, JSON_SORT_KEYS);
    CHECK_INT (cn_sysinfo_load (sorted, strlen (sorted), UUID_LC, &si2, err, sizeof err), 0);
    CHECK (!si2 || strcmp (si2->text, si->text) != 0);
    json_decref (t);
    free (sorted);
    char *moved = s_fixture_with ("Network Interfaces",
                                  "{\"e0\":{\"MAC Address\":\"00:00:00:00:00:01\"}}");
    CHECK_INT (cn_sysinfo_load (moved, strlen (moved), UUID_LC, &other, err, sizeof err), 0);
    free (moved);

    cn_sysinfo_ctx_t c = s_ctx (T0);
    json_t *rec = NULL, *out = NULL;
    CHECK_INT (cn_server_apply_sysinfo_si (NULL, NULL, si, &c, &rec), CN_SRV_WRITE);
    CHECK (rec && json_object_get (rec, "sysinfo") == NULL);
    /* the joined record is what cn_server_apply_sysinfo makes */
    json_t *joined = s_new_record ();
    json_t *mine = json_copy (rec);
    json_t *tree = cn_sysinfo_tree (si);
    json_object_set_new (mine, "sysinfo", tree);
    CHECK (json_equal (mine, joined));
    json_decref (mine);
    json_decref (joined);

    c = s_ctx (T0 + 1000);
    CHECK_INT (cn_server_apply_sysinfo_si (rec, si, si, &c, &out), CN_SRV_UNCHANGED);
    CHECK_INT (cn_server_apply_sysinfo_si (rec, si, si2, &c, &out), CN_SRV_UNCHANGED);
    CHECK (out == NULL);
    /* no stored sysinfo: a change */
    CHECK_INT (cn_server_apply_sysinfo_si (rec, NULL, si, &c, &out), CN_SRV_WRITE);
    json_decref (out);
    /* other NICs: another machine; the report, without a sysinfo */
    CHECK_INT (cn_server_apply_sysinfo_si (rec, si, other, &c, &out), CN_SRV_CONFLICT);
    CHECK (out && json_object_get (out, "sysinfo") == NULL);
    CHECK_INT (json_array_size (json_object_get (out, "uuid_conflicts")), 1);
    json_decref (out);
    json_decref (rec);
    cn_sysinfo_unref (&si);
    cn_sysinfo_unref (&si2);
    cn_sysinfo_unref (&other);
}

static void
test_new_server (void)
{
    json_t *rec = s_new_record ();
    CHECK_STR (s_get_str (rec, "uuid"), UUID_LC);
    CHECK_STR (s_get_str (rec, "hostname"), "cn-r12-07");
    CHECK_STR (s_get_str (rec, "datacenter"), "eu-west-7");
    CHECK (json_is_true (json_object_get (rec, "setup")));
    CHECK (json_is_false (json_object_get (rec, "headnode")));
    CHECK_INT (s_get_int (rec, "ram"), 196511);
    CHECK_INT (s_get_int (rec, "memory_total_bytes"), 196511LL * 1048576);
    /* 196511 MiB less 15 %, no VMs */
    CHECK_INT (s_get_int (rec, "memory_provisionable_bytes"),
               (long long) (196511.0 * 1048576 * 0.85));
    CHECK_STR (s_get_str (rec, "current_platform"), "20240606T000431Z");
    CHECK_STR (s_get_str (rec, "boot_platform"), "20240606T000431Z");
    CHECK_STR (s_get_str (rec, "last_boot"), "2024-06-10T06:13:20.000Z");
    CHECK_STR (s_get_str (rec, "created"), "2022-04-15T05:20:00.000Z");
    CHECK_STR (s_get_str (rec, "admin_ip"), "10.66.0.37");
    CHECK_INT (s_get_int (rec, "agent_port"), 5309);
    CHECK_INT (s_get_int (rec, "last_sysinfo"), T0);
    CHECK_INT (s_get_int (rec, "sysinfo_ms"), T0);
    /* defaults */
    CHECK (json_is_false (json_object_get (rec, "reserved")));
    CHECK (json_is_false (json_object_get (rec, "reservoir")));
    CHECK_STR (s_get_str (rec, "comments"), "");
    CHECK_STR (s_get_str (rec, "rack_identifier"), "");
    CHECK_STR (s_get_str (rec, "default_console"), "serial");
    CHECK_STR (s_get_str (rec, "serial"), "ttyb");
    CHECK (json_real_value (json_object_get (rec, "reservation_ratio")) == 0.15);
    CHECK (json_is_object (json_object_get (rec, "traits")));
    CHECK_INT (json_object_size (json_object_get (rec, "traits")), 0);
    CHECK_INT (json_object_size (json_object_get (rec, "vms")), 0);
    CHECK_INT (json_object_size (json_object_get (rec, "boot_params")), 0);
    CHECK (json_is_object (json_object_get (rec, "kernel_flags")));
    /* agents from "SDC Agents" while the record has none */
    CHECK_INT (json_array_size (json_object_get (rec, "agents")), 9);
    /* the whole sysinfo is kept */
    CHECK_STR (s_get_str (json_object_get (rec, "sysinfo"), "Serial Number"), "S31415926535");
    CHECK (json_object_get (rec, "status") == NULL);
    CHECK (json_object_get (rec, "uuid_conflicts") == NULL);
    json_decref (rec);
}

static void
test_derivation_variants (void)
{
    cn_sysinfo_ctx_t c = s_ctx (T0);
    json_t *rec = NULL;
    /* headnode "true", agent overrides, no Zpool Creation (created = now),
     * Setup false, memory as a number */
    json_t *si = s_sysinfo ("{\"Boot Parameters\": {\"headnode\": \"true\"},"
                            " \"CN Agent IP\": \"10.0.0.9\", \"CN Agent Port\": \"5310\","
                            " \"Zpool Creation\": null, \"Setup\": false,"
                            " \"MiB of Memory\": 4096}");
    CHECK_INT (cn_server_apply_sysinfo (NULL, si, &c, &rec), CN_SRV_WRITE);
    CHECK (json_is_true (json_object_get (rec, "headnode")));
    CHECK (json_is_false (json_object_get (rec, "setup")));
    CHECK_STR (s_get_str (rec, "admin_ip"), "10.0.0.9");
    CHECK_INT (s_get_int (rec, "agent_port"), 5310);
    CHECK_STR (s_get_str (rec, "created"), "2024-06-10T06:15:00.000Z");
    CHECK_INT (s_get_int (rec, "ram"), 4096);
    json_decref (rec);
    json_decref (si);

    /* "Admin IP" beats the NICs; no Setup key: a zpool means set up */
    si = s_sysinfo ("{\"Admin IP\": \"10.0.0.10\", \"Setup\": null}");
    CHECK_INT (cn_server_apply_sysinfo (NULL, si, &c, &rec), CN_SRV_WRITE);
    CHECK_STR (s_get_str (rec, "admin_ip"), "10.0.0.10");
    CHECK (json_is_true (json_object_get (rec, "setup")));
    json_decref (rec);
    json_decref (si);

    /* an unsetup server: no zpool, no Setup, admin NIC without an address */
    si = s_sysinfo ("{\"Setup\": null, \"Zpool\": null, \"Network Interfaces\":"
                    " {\"e0\": {\"MAC Address\": \"00:00:00:00:00:01\", \"ip4addr\": \"\","
                    " \"NIC Names\": [\"admin\"]}}}");
    CHECK_INT (cn_server_apply_sysinfo (NULL, si, &c, &rec), CN_SRV_WRITE);
    CHECK (json_is_false (json_object_get (rec, "setup")));
    CHECK (json_object_get (rec, "admin_ip") == NULL);
    json_decref (rec);
    json_decref (si);

    /* a custom admin NIC tag, found on a virtual NIC */
    si = s_sysinfo ("{\"Admin NIC Tag\": \"mgmt\", \"Virtual Network Interfaces\":"
                    " {\"mgmt0\": {\"ip4addr\": \"192.168.9.4\", \"NIC Names\": [\"mgmt\"]}}}");
    CHECK_INT (cn_server_apply_sysinfo (NULL, si, &c, &rec), CN_SRV_WRITE);
    CHECK_STR (s_get_str (rec, "admin_ip"), "192.168.9.4");
    json_decref (rec);
    json_decref (si);
}

static void
test_operator_fields_kept (void)
{
    json_t *rec = s_new_record ();
    cn_apierr_t e = { 0 };
    json_t *p = json_pack ("{s:b, s:s, s:s, s:{s:b}, s:s, s:f, s:s}", "reserved", 1,
                           "comments", "rack 12, slot 7", "rack_identifier", "r12",
                           "traits", "ssd", 1, "boot_platform", "20240101T000000Z",
                           "reservation_ratio", 0.25, "default_console", "vga");
    CHECK_INT (cn_server_update (rec, p, T0, &e), 0);
    json_decref (p);

    /* a new platform, a later boot, more memory */
    json_t *si = s_sysinfo ("{\"Live Image\": \"20240620T000000Z\", \"Boot Time\": \"1718086400\","
                            " \"MiB of Memory\": \"262111\"}");
    cn_sysinfo_ctx_t c = s_ctx (T0 + 86400000);
    json_t *out = NULL;
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    CHECK (json_is_true (json_object_get (out, "reserved")));
    CHECK_STR (s_get_str (out, "comments"), "rack 12, slot 7");
    CHECK_STR (s_get_str (out, "rack_identifier"), "r12");
    CHECK (json_is_true (json_object_get (json_object_get (out, "traits"), "ssd")));
    CHECK_STR (s_get_str (out, "default_console"), "vga");
    CHECK_STR (s_get_str (out, "boot_platform"), "20240101T000000Z");
    CHECK_STR (s_get_str (out, "current_platform"), "20240620T000000Z");
    CHECK_STR (s_get_str (out, "last_boot"), "2024-06-11T06:13:20.000Z");
    CHECK_STR (s_get_str (out, "created"), "2022-04-15T05:20:00.000Z");
    CHECK_INT (s_get_int (out, "ram"), 262111);
    CHECK_INT (s_get_int (out, "memory_total_bytes"), 262111LL * 1048576);
    CHECK_INT (s_get_int (out, "memory_provisionable_bytes"),
               (long long) (262111.0 * 1048576 * 0.75));
    CHECK (json_real_value (json_object_get (out, "reservation_ratio")) == 0.25);
    json_decref (out);
    json_decref (si);
    json_decref (rec);
}

static void
test_unchanged_and_freshness (void)
{
    json_t *rec = s_new_record ();
    json_t *si = s_sysinfo (NULL);
    json_t *out = NULL;

    /* the same sysinfo 10 s later: nothing to write */
    cn_sysinfo_ctx_t c = s_ctx (T0 + 10000);
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_UNCHANGED);
    CHECK (out == NULL);

    /* just under a third of the window: still nothing */
    c = s_ctx (T0 + FRESH * 1000 / 3 - 1);
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_UNCHANGED);

    /* a third of the window: rewrite, only the freshness fields differ */
    c = s_ctx (T0 + FRESH * 1000 / 3);
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    CHECK_INT (s_get_int (out, "last_sysinfo"), T0 + FRESH * 1000 / 3);
    json_object_set (out, "last_sysinfo", json_object_get (rec, "last_sysinfo"));
    json_object_set (out, "sysinfo_ms", json_object_get (rec, "sysinfo_ms"));
    CHECK (json_equal (out, rec));
    json_decref (out);

    /* a changed hostname is a change (same NICs: same machine) */
    json_t *si2 = s_sysinfo ("{\"Hostname\": \"cn-r12-07b\"}");
    c = s_ctx (T0 + 5000);
    CHECK_INT (cn_server_apply_sysinfo (rec, si2, &c, &out), CN_SRV_WRITE);
    CHECK_STR (s_get_str (out, "hostname"), "cn-r12-07b");
    CHECK (json_object_get (out, "uuid_conflicts") == NULL);
    json_decref (out);
    json_decref (si2);
    json_decref (si);
    json_decref (rec);
}

static void
test_stale (void)
{
    json_t *rec = s_new_record ();
    json_t *si = s_sysinfo ("{\"Hostname\": \"older\"}");
    json_t *out = (json_t *) 1;
    /* sent before the stored sysinfo (sysinfo_ms = T0): stale */
    cn_sysinfo_ctx_t c = s_ctx (T0 + 1000);
    c.sent_ms = T0 - 1;
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_STALE);
    CHECK (out == NULL);
    /* sent at the same ms: applied */
    c.sent_ms = T0;
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    CHECK_INT (s_get_int (out, "sysinfo_ms"), T0);
    CHECK_INT (s_get_int (out, "last_sysinfo"), T0 + 1000);
    json_decref (out);
    json_decref (si);
    json_decref (rec);
}

static void
test_transitional_cleared_on_reboot (void)
{
    json_t *rec = s_new_record ();
    json_object_set_new (rec, "transitional_status", json_string ("rebooting"));
    json_t *out = NULL;
    /* same boot time: kept */
    json_t *si = s_sysinfo ("{\"Hostname\": \"x\"}");
    cn_sysinfo_ctx_t c = s_ctx (T0 + 1000);
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    CHECK_STR (s_get_str (out, "transitional_status"), "rebooting");
    json_decref (out);
    json_decref (si);
    /* a new boot time: the reboot is over */
    si = s_sysinfo ("{\"Boot Time\": \"1718086400\"}");
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    CHECK (json_object_get (out, "transitional_status") == NULL);
    json_decref (out);
    json_decref (si);
    json_decref (rec);
}

static void
test_duplicate_uuid (void)
{
    json_t *rec = s_new_record ();
    json_t *out = NULL;
    /* another machine (disjoint MACs) sends the same UUID */
    json_t *other = s_sysinfo ("{\"Hostname\": \"impostor\", \"Network Interfaces\": {"
                               " \"e0\": {\"MAC Address\": \"00:0C:29:00:00:0B\","
                               "  \"ip4addr\": \"10.66.0.99\", \"NIC Names\": [\"admin\"]},"
                               " \"e1\": {\"MAC Address\": \"00:0c:29:00:00:0a\"}}}");
    cn_sysinfo_ctx_t c = s_ctx (T0 + 1000);
    CHECK_INT (cn_server_apply_sysinfo (rec, other, &c, &out), CN_SRV_CONFLICT);
    CHECK (out != NULL);
    /* the first machine's data stays */
    CHECK_STR (s_get_str (out, "hostname"), "cn-r12-07");
    CHECK_STR (s_get_str (out, "admin_ip"), "10.66.0.37");
    CHECK_INT (s_get_int (out, "last_sysinfo"), T0);
    CHECK (json_equal (json_object_get (out, "sysinfo"), json_object_get (rec, "sysinfo")));
    json_t *list = json_object_get (out, "uuid_conflicts");
    CHECK_INT (json_array_size (list), 1);
    json_t *r = json_array_get (list, 0);
    CHECK_STR (s_get_str (r, "hostname"), "impostor");
    json_t *macs = json_object_get (r, "macs");
    CHECK_INT (json_array_size (macs), 2);
    CHECK_STR (json_string_value (json_array_get (macs, 0)), "00:0c:29:00:00:0a");
    CHECK_STR (json_string_value (json_array_get (macs, 1)), "00:0c:29:00:00:0b");
    CHECK_STR (s_get_str (r, "first_seen"), "2024-06-10T06:15:01.000Z");
    CHECK_STR (s_get_str (r, "last_seen"), "2024-06-10T06:15:01.000Z");
    CHECK_INT (s_get_int (r, "count"), 1);

    /* again soon: nothing new to record */
    json_t *rec2 = out;
    out = (json_t *) 1;
    c = s_ctx (T0 + 2000);
    CHECK_INT (cn_server_apply_sysinfo (rec2, other, &c, &out), CN_SRV_CONFLICT);
    CHECK (out == NULL);

    /* after a third of the window: last_seen and count move */
    c = s_ctx (T0 + 1000 + FRESH * 1000 / 3);
    CHECK_INT (cn_server_apply_sysinfo (rec2, other, &c, &out), CN_SRV_CONFLICT);
    CHECK (out != NULL);
    r = json_array_get (json_object_get (out, "uuid_conflicts"), 0);
    CHECK_INT (s_get_int (r, "count"), 2);
    CHECK_STR (s_get_str (r, "first_seen"), "2024-06-10T06:15:01.000Z");
    CHECK_STR (s_get_str (r, "last_seen"), "2024-06-10T06:15:31.000Z");
    json_decref (out);

    /* the real machine still updates its record, and the reports stay */
    json_t *si = s_sysinfo ("{\"Live Image\": \"20240620T000000Z\"}");
    c = s_ctx (T0 + 3000);
    CHECK_INT (cn_server_apply_sysinfo (rec2, si, &c, &out), CN_SRV_WRITE);
    CHECK_STR (s_get_str (out, "current_platform"), "20240620T000000Z");
    CHECK_INT (json_array_size (json_object_get (out, "uuid_conflicts")), 1);
    json_decref (out);
    json_decref (si);

    /* sharing one NIC: the same machine (a NIC was swapped), not a conflict */
    si = s_sysinfo ("{\"Network Interfaces\": {"
                    " \"igb0\": {\"MAC Address\": \"ac:1f:6b:8e:10:02\", \"ip4addr\": \"10.66.0.37\","
                    "  \"NIC Names\": [\"admin\"]},"
                    " \"igb9\": {\"MAC Address\": \"ac:1f:6b:8e:99:99\"}}}");
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    json_decref (out);
    json_decref (si);

    /* no MACs on one side: the hostname decides */
    si = s_sysinfo ("{\"Network Interfaces\": {}, \"Hostname\": \"elsewhere\"}");
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_CONFLICT);
    CHECK (out != NULL);
    r = json_array_get (json_object_get (out, "uuid_conflicts"), 0);
    CHECK_INT (json_array_size (json_object_get (r, "macs")), 0);
    json_decref (out);
    json_decref (si);
    si = s_sysinfo ("{\"Network Interfaces\": {}}");
    CHECK_INT (cn_server_apply_sysinfo (rec, si, &c, &out), CN_SRV_WRITE);
    json_decref (out);
    json_decref (si);

    /* the reports are bounded */
    json_t *cur = json_deep_copy (rec);
    for (int i = 0; i < 20; i++) {
        char mods[256];
        snprintf (mods, sizeof mods, "{\"Hostname\": \"h%d\", \"Network Interfaces\":"
                  " {\"e0\": {\"MAC Address\": \"02:00:00:00:00:%02x\"}}}", i, (unsigned) i);
        si = s_sysinfo (mods);
        c = s_ctx (T0 + 10000 + i);
        CHECK_INT (cn_server_apply_sysinfo (cur, si, &c, &out), CN_SRV_CONFLICT);
        json_decref (cur);
        cur = out;
        json_decref (si);
    }
    list = json_object_get (cur, "uuid_conflicts");
    CHECK_INT (json_array_size (list), 16);
    CHECK_STR (s_get_str (json_array_get (list, 15), "hostname"), "h19");
    CHECK_STR (s_get_str (json_array_get (list, 0), "hostname"), "h4");
    json_decref (cur);

    json_decref (rec2);
    json_decref (other);
    json_decref (rec);
}

static void
test_status (void)
{
    json_t *rec = s_new_record ();
    CHECK_STR (cn_server_status (rec, T0, FRESH, NULL), "running");
    CHECK_STR (cn_server_status (rec, T0 + FRESH * 1000 - 1, FRESH, NULL), "running");
    CHECK_STR (cn_server_status (rec, T0 + FRESH * 1000, FRESH, NULL), "unknown");
    json_object_set_new (rec, "transitional_status", json_string ("rebooting"));
    /* transitional_status explains an unreachable server; while sysinfo is
     * fresh the server is running (the reference's rule) */
    CHECK_STR (cn_server_status (rec, T0, FRESH, NULL), "running");
    CHECK_STR (cn_server_status (rec, T0 + FRESH * 1000, FRESH, NULL), "rebooting");
    json_object_set_new (rec, "transitional_status", json_string (""));
    CHECK_STR (cn_server_status (rec, T0 + FRESH * 1000, FRESH, NULL), "unknown");
    json_object_del (rec, "last_sysinfo");
    CHECK_STR (cn_server_status (rec, T0, FRESH, NULL), "unknown");
    json_decref (rec);
}

/* Run a list query on params given as JSON text. */
static int
s_query (const char *params, cn_server_query_t *q, cn_apierr_t *e)
{
    json_t *p = json_loads (params, 0, NULL);
    CHECK (p != NULL);
    int rc = cn_server_list_query (p, q, e);
    json_decref (p);
    return rc;
}

static const char *
s_err0 (const cn_apierr_t *e, const char *key)
{
    return json_string_value (json_object_get (json_array_get (e->errors, 0), key));
}

static void
test_list_query (void)
{
    cn_server_query_t q;
    cn_apierr_t e = { 0 };

    CHECK_INT (cn_server_list_query (NULL, &q, &e), 0);
    CHECK_STR (q.filter, "(&(uuid=*)(!(uuid=default)))");
    CHECK_INT (q.limit, 1000);
    CHECK_INT (q.offset, 0);
    CHECK_INT (q.extras, 0);
    CHECK (q.fields == NULL);
    CHECK_INT (q.nfields, 0);
    cn_server_query_fini (&q);

    CHECK_INT (s_query ("{\"setup\": \"true\", \"headnode\": \"FALSE\", \"reserved\": false,"
                        " \"reservoir\": true, \"hostname\": \"cn*(1)\\\\\","
                        " \"limit\": \"50\", \"offset\": 100}", &q, &e), 0);
    CHECK_STR (q.filter, "(&(uuid=*)(setup=true)(headnode=false)(reserved=false)"
                         "(reservoir=true)(hostname=cn\\2a\\281\\29\\5c)(!(uuid=default)))");
    CHECK_INT (q.limit, 50);
    CHECK_INT (q.offset, 100);
    cn_server_query_fini (&q);
    CHECK (q.filter == NULL);

    CHECK_INT (s_query ("{\"uuids\": \"44454C4C-3900-1046-8033-B2C04F4B4E32\"}", &q, &e), 0);
    CHECK_STR (q.filter, "(&(uuid=" UUID_LC ")(!(uuid=default)))");
    cn_server_query_fini (&q);
    CHECK_INT (s_query ("{\"uuids\": \"" UUID_LC " , 00000000-0000-0000-0000-000000000001\"}",
                        &q, &e), 0);
    CHECK_STR (q.filter, "(&(|(uuid=" UUID_LC ")(uuid=00000000-0000-0000-0000-000000000001))"
                         "(!(uuid=default)))");
    cn_server_query_fini (&q);
    CHECK_INT (s_query ("{\"uuids\": [\"" UUID_LC "\"]}", &q, &e), 0);
    CHECK_STR (q.filter, "(&(uuid=" UUID_LC ")(!(uuid=default)))");
    cn_server_query_fini (&q);

    CHECK_INT (s_query ("{\"extras\": \"sysinfo,vms\", \"fields\": \"uuid, hostname,status\"}",
                        &q, &e), 0);
    CHECK_INT (q.extras, CN_EXTRA_SYSINFO | CN_EXTRA_VMS);
    CHECK_INT (q.nfields, 3);
    CHECK_STR (q.fields[0], "uuid");
    CHECK_STR (q.fields[1], "hostname");
    CHECK_STR (q.fields[2], "status");
    cn_server_query_fini (&q);
    CHECK_INT (s_query ("{\"extras\": \"all\"}", &q, &e), 0);
    CHECK_INT (q.extras, CN_EXTRA_ALL);
    cn_server_query_fini (&q);
    CHECK_INT (s_query ("{\"extras\": \"agents,memory,disk,capacity,last_heartbeat\"}", &q, &e), 0);
    CHECK_INT (q.extras, CN_EXTRA_AGENTS | CN_EXTRA_MEMORY | CN_EXTRA_DISK | CN_EXTRA_CAPACITY);
    cn_server_query_fini (&q);
    CHECK_INT (s_query ("{\"limit\": 1}", &q, &e), 0);
    CHECK_INT (q.limit, 1);
    cn_server_query_fini (&q);
    CHECK_INT (s_query ("{\"limit\": \"1000\"}", &q, &e), 0);
    CHECK_INT (q.limit, 1000);
    cn_server_query_fini (&q);

    /* strict: an unknown parameter */
    CHECK_INT (s_query ("{\"setup\": \"true\", \"datacenter\": \"x\"}", &q, &e), -1);
    CHECK_INT (e.status, 409);
    CHECK_STR (e.code, "InvalidArgument");
    CHECK_STR (e.message, "datacenter is not an explicitly defined parameter");
    CHECK (q.filter == NULL);

    /* rule failures: 500 InvalidParameters, every failure listed */
    CHECK_INT (s_query ("{\"setup\": \"yes\", \"limit\": \"ten\"}", &q, &e), -1);
    CHECK_INT (e.status, 500);
    CHECK_STR (e.code, "InvalidParameters");
    CHECK_STR (e.message, "Request parameters failed validation");
    CHECK_INT (json_array_size (e.errors), 2);
    CHECK_STR (s_err0 (&e, "field"), "setup");
    CHECK_STR (s_err0 (&e, "code"), "Invalid");
    CHECK_STR (s_err0 (&e, "message"), "Invalid value for param 'setup'");
    CHECK_STR (json_string_value (json_object_get (json_array_get (e.errors, 1), "field")),
               "limit");
    cn_apierr_fini (&e);

    static const struct {
        const char *params, *field, *message;
        int status;
    } bad[] = {
        { "{\"limit\": \"0\"}", "limit", "limit must be in the range 1-1000 (inclusive)", 400 },
        { "{\"limit\": 1001}", "limit", "limit must be in the range 1-1000 (inclusive)", 400 },
        { "{\"limit\": \"-3\"}", "limit", "limit must be in the range 1-1000 (inclusive)", 400 },
        { "{\"limit\": \"1.5\"}", "limit", "Invalid value for param 'limit'", 500 },
        { "{\"limit\": \"010\"}", "limit", "Invalid value for param 'limit'", 500 },
        { "{\"offset\": \"-1\"}", "offset", "offset must be 0 or more", 400 },
        { "{\"offset\": \"x\"}", "offset", "Invalid value for param 'offset'", 500 },
        { "{\"uuids\": \"abc\"}", "uuids",
          "Invalid value for param 'uuids' (a comma-separated list of UUIDs)", 500 },
        { "{\"uuids\": \"" UUID_LC ",\"}", "uuids",
          "Invalid value for param 'uuids' (a comma-separated list of UUIDs)", 500 },
        { "{\"uuids\": \"\"}", "uuids",
          "Invalid value for param 'uuids' (a comma-separated list of UUIDs)", 500 },
        { "{\"reserved\": 1}", "reserved", "Invalid value for param 'reserved'", 500 },
        { "{\"hostname\": 5}", "hostname", "value was not a string", 500 },
        { "{\"hostname\": \" cn1\"}", "hostname",
          "value contains leading or trailing whitespace", 500 },
        { "{\"hostname\": \"\"}", "hostname", "value is empty", 500 },
        { "{\"extras\": \"vms;sysinfo\"}", "extras", "Invalid value for param 'extras'", 500 },
        { "{\"extras\": \"vms,\"}", "extras", "Invalid value for param 'extras'", 500 },
        { "{\"fields\": \"uuid,a-b\"}", "fields", "Invalid value for param 'fields'", 500 },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset (&e, 0, sizeof e);
        CHECK_INT (s_query (bad[i].params, &q, &e), -1);
        CHECK_INT (e.status, bad[i].status);
        CHECK_STR (e.code, "InvalidParameters");
        CHECK_INT (json_array_size (e.errors), 1);
        CHECK_STR (s_err0 (&e, "field"), bad[i].field);
        const char *m = s_err0 (&e, "message");
        if (!m || strcmp (m, bad[i].message) != 0)
            printf ("  case %zu: %s\n", i, bad[i].params);
        CHECK_STR (m, bad[i].message);
        CHECK (q.filter == NULL && q.fields == NULL);
        cn_apierr_fini (&e);
    }
}

static void
test_render (void)
{
    json_t *rec = s_new_record ();
    json_object_set_new (rec, "vms", json_pack ("{s:{s:i, s:i, s:s, s:s}}",
                                                "9edf7ee3-86c3-40ef-be3b-ec8f73c3d747",
                                                "max_physical_memory", 2048, "cpu_cap", 400,
                                                "brand", "joyent", "state", "running"));
    json_object_set_new (rec, "disk_pool_size_bytes", json_integer (3456LL << 30));
    json_object_set_new (rec, "disk_installed_images_used_bytes", json_integer (10LL << 30));
    json_object_set_new (rec, "disk_cores_quota_used_bytes", json_integer (0));
    json_object_set_new (rec, "overprovision_ratios", json_string ("cpu=4&ram=1"));

    /* the default list view */
    json_t *v = cn_server_render (rec, false, 0, NULL, 0, T0 + 1000, FRESH, NULL);
    CHECK_STR (s_get_str (v, "status"), "running");
    CHECK_STR (s_get_str (v, "uuid"), UUID_LC);
    CHECK_STR (s_get_str (v, "hostname"), "cn-r12-07");
    CHECK (json_object_get (v, "sysinfo") == NULL);
    CHECK (json_object_get (v, "vms") == NULL);
    CHECK (json_object_get (v, "agents") == NULL);
    CHECK (json_object_get (v, "memory_total_bytes") == NULL);
    CHECK (json_object_get (v, "memory_provisionable_bytes") == NULL);
    CHECK (json_object_get (v, "disk_pool_size_bytes") == NULL);
    CHECK (json_object_get (v, "unreserved_ram") == NULL);
    CHECK (json_object_get (v, "last_heartbeat") == NULL);
    CHECK (json_object_get (v, "last_sysinfo") == NULL);
    CHECK (json_object_get (v, "sysinfo_ms") == NULL);
    json_t *ratios = json_object_get (v, "overprovision_ratios");
    CHECK_INT (json_integer_value (json_object_get (ratios, "cpu")), 4);
    CHECK_INT (json_integer_value (json_object_get (ratios, "ram")), 1);
    json_decref (v);

    /* extras */
    v = cn_server_render (rec, false, CN_EXTRA_SYSINFO | CN_EXTRA_VMS, NULL, 0, T0, FRESH, NULL);
    CHECK (json_is_object (json_object_get (v, "sysinfo")));
    CHECK (json_is_object (json_object_get (v, "vms")));
    CHECK (json_object_get (v, "agents") == NULL);
    CHECK_STR (s_get_str (v, "last_heartbeat"), "2024-06-10T06:15:00.000Z");
    json_decref (v);
    v = cn_server_render (rec, false, CN_EXTRA_MEMORY | CN_EXTRA_DISK | CN_EXTRA_AGENTS,
                          NULL, 0, T0, FRESH, NULL);
    CHECK (json_object_get (v, "memory_total_bytes") != NULL);
    CHECK (json_object_get (v, "disk_pool_size_bytes") != NULL);
    CHECK_INT (json_array_size (json_object_get (v, "agents")), 9);
    CHECK (json_object_get (v, "sysinfo") == NULL);
    json_decref (v);

    /* capacity: 48 cores, one VM capped at 400 with cpu ratio 4 */
    v = cn_server_render (rec, false, CN_EXTRA_CAPACITY, NULL, 0, T0, FRESH, NULL);
    CHECK_INT (s_get_int (v, "unreserved_cpu"), 4800 - 100);
    CHECK_INT (s_get_int (v, "unreserved_ram"),
               (long long) (196511 * 0.85 - 2048));
    CHECK_INT (s_get_int (v, "unreserved_disk"), (3456LL - 10) * 1024);
    CHECK (json_object_get (v, "sysinfo") == NULL);
    CHECK (json_object_get (v, "vms") == NULL);
    json_decref (v);

    /* the full view: everything but the internal fields */
    v = cn_server_render (rec, true, 0, NULL, 0, T0 + FRESH * 1000, FRESH, NULL);
    CHECK_STR (s_get_str (v, "status"), "unknown");
    CHECK_STR (s_get_str (v, "last_heartbeat"), "2024-06-10T06:15:00.000Z");
    CHECK (json_is_object (json_object_get (v, "sysinfo")));
    CHECK (json_is_object (json_object_get (v, "vms")));
    CHECK (json_is_array (json_object_get (v, "agents")));
    CHECK (json_object_get (v, "memory_total_bytes") != NULL);
    CHECK (json_object_get (v, "unreserved_cpu") != NULL);
    CHECK (json_object_get (v, "last_sysinfo") == NULL);
    CHECK (json_object_get (v, "sysinfo_ms") == NULL);
    CHECK_STR (s_get_str (v, "admin_ip"), "10.66.0.37");
    json_decref (v);

    /* rebooting: shown once the server stops reporting */
    json_object_set_new (rec, "transitional_status", json_string ("rebooting"));
    v = cn_server_render (rec, true, 0, NULL, 0, T0 + FRESH * 1000, FRESH, NULL);
    CHECK_STR (s_get_str (v, "status"), "rebooting");
    json_decref (v);

    /* fields: exactly those, whatever the extras */
    char *fields[] = { "uuid", "hostname", "status", "sysinfo", "nosuchfield" };
    v = cn_server_render (rec, false, 0, fields, 5, T0, FRESH, NULL);
    CHECK_INT (json_object_size (v), 4);
    CHECK_STR (s_get_str (v, "status"), "running");
    CHECK (json_is_object (json_object_get (v, "sysinfo")));
    json_decref (v);

    /* a record without sysinfo: capacity zero, no last_heartbeat */
    json_t *bare = json_pack ("{s:s}", "uuid", UUID_LC);
    v = cn_server_render (bare, true, 0, NULL, 0, T0, FRESH, NULL);
    CHECK_STR (s_get_str (v, "status"), "unknown");
    CHECK (json_is_null (json_object_get (v, "last_heartbeat")));
    CHECK_INT (s_get_int (v, "unreserved_ram"), 0);
    CHECK (json_object_get (v, "overprovision_ratios") == NULL);
    json_decref (v);
    json_decref (bare);
    json_decref (rec);
}

static json_t *
s_update (json_t *rec, const char *params, cn_apierr_t *e)
{
    json_t *p = json_loads (params, 0, NULL);
    CHECK (p != NULL);
    memset (e, 0, sizeof *e);
    int rc = cn_server_update (rec, p, T0, e);
    json_decref (p);
    return rc == 0 ? rec : NULL;
}

static void
test_update (void)
{
    json_t *rec = s_new_record ();
    json_t *before = json_deep_copy (rec);
    cn_apierr_t e;

    /* strict */
    CHECK (s_update (rec, "{\"comments\": \"x\", \"hostname\": \"y\"}", &e) == NULL);
    CHECK_INT (e.status, 409);
    CHECK_STR (e.code, "InvalidArgument");
    CHECK_STR (e.message, "hostname is not an explicitly defined parameter");
    CHECK (json_equal (rec, before));

    /* rule failures, all of them, in the reference's order */
    CHECK (s_update (rec, "{\"traits\": [], \"reserved\": \"yes\", \"comments\": 5,"
                          " \"reservation_ratio\": \"lots\", \"agents\": {},"
                          " \"serial\": \" ttya\", \"setup\": null}", &e) == NULL);
    CHECK_INT (e.status, 500);
    CHECK_STR (e.code, "InvalidParameters");
    CHECK_STR (e.message, "Request parameters failed validation");
    static const char *const want[][2] = {
        { "agents", "value was not an array" },
        { "comments", "value was not a string" },
        { "reservation_ratio", "value was not a number" },
        { "reserved", "value was not true or false" },
        { "serial", "value contains leading or trailing whitespace" },
        { "setup", "value was not true or false" },
        { "traits", "value is not an object. (was: [object Array])" },
    };
    CHECK_INT (json_array_size (e.errors), 7);
    for (size_t i = 0; i < 7; i++) {
        json_t *x = json_array_get (e.errors, i);
        CHECK_STR (s_get_str (x, "field"), want[i][0]);
        CHECK_STR (s_get_str (x, "code"), "Invalid");
        CHECK_STR (s_get_str (x, "message"), want[i][1]);
    }
    char *body = cn_apierr_body (&e);
    CHECK (strstr (body, "\"code\":\"InvalidParameters\"") != NULL);
    free (body);
    cn_apierr_fini (&e);
    CHECK (json_equal (rec, before));

    CHECK (s_update (rec, "{\"reservation_ratio\": 1.5}", &e) == NULL);
    CHECK_STR (s_err0 (&e, "message"), "value must be between 0 and 1");
    cn_apierr_fini (&e);

    /* the reference's 409 checks */
    CHECK (s_update (rec, "{\"next_reboot\": \"tomorrow\"}", &e) == NULL);
    CHECK_INT (e.status, 409);
    CHECK_STR (e.message, "Invalid date for next_reboot; not an ISO date format");
    CHECK (s_update (rec, "{\"next_reboot\": \"2024-02-30T00:00:00.000Z\"}", &e) == NULL);
    CHECK (s_update (rec, "{\"overprovision_ratios\": {\"gpu\": 2}}", &e) == NULL);
    CHECK_STR (e.message, "Invalid key gpu");
    CHECK (s_update (rec, "{\"overprovision_ratios\": {\"cpu\": \"2\"}}", &e) == NULL);
    CHECK_STR (e.message, "Invalid type for cpu");
    CHECK (s_update (rec, "{\"overprovision_ratios\": {\"ram\": -1}}", &e) == NULL);
    CHECK_STR (e.message, "Invalid value for ram");
    CHECK (json_equal (rec, before));

    /* success */
    CHECK (s_update (rec, "{\"reserved\": true, \"reservoir\": \"true\", \"setting_up\": false,"
                          " \"comments\": \"new disks\", \"traits\": {\"ssd\": true},"
                          " \"reservation_ratio\": \"0.5\", \"next_reboot\":"
                          " \"2024-07-01T02:00:00.000Z\", \"overprovision_ratios\":"
                          " {\"cpu\": 4, \"ram\": 1.5}, \"agents\": [{\"name\": \"cn-agent\"}],"
                          " \"boot_params\": {\"console\": \"vga\"}, \"transitional_status\":"
                          " \"rebooting\", \"etag_retries\": 3, \"datacenter\": \"dc2\","
                          " \"default_console\": \"vga\", \"serial\": \"ttya\","
                          " \"rack_identifier\": \"r1\", \"boot_platform\": \"20240620T000000Z\","
                          " \"setup\": true}", &e) == rec);
    CHECK (json_is_true (json_object_get (rec, "reserved")));
    CHECK (json_is_true (json_object_get (rec, "reservoir")));
    CHECK (json_is_false (json_object_get (rec, "setting_up")));
    CHECK_STR (s_get_str (rec, "comments"), "new disks");
    CHECK (json_is_true (json_object_get (json_object_get (rec, "traits"), "ssd")));
    CHECK (json_real_value (json_object_get (rec, "reservation_ratio")) == 0.5);
    CHECK_INT (s_get_int (rec, "memory_provisionable_bytes"),
               (long long) (196511.0 * 1048576 * 0.5));
    CHECK_STR (s_get_str (rec, "next_reboot"), "2024-07-01T02:00:00.000Z");
    CHECK_STR (s_get_str (rec, "overprovision_ratios"), "cpu=4&ram=1.5");
    CHECK_INT (json_array_size (json_object_get (rec, "agents")), 1);
    CHECK_STR (s_get_str (json_object_get (rec, "boot_params"), "console"), "vga");
    CHECK_STR (s_get_str (rec, "transitional_status"), "rebooting");
    CHECK (json_object_get (rec, "etag_retries") == NULL);
    CHECK_STR (s_get_str (rec, "datacenter"), "dc2");
    CHECK_STR (s_get_str (rec, "serial"), "ttya");
    CHECK_STR (s_get_str (rec, "boot_platform"), "20240620T000000Z");
    CHECK_STR (s_get_str (rec, "uuid"), UUID_LC);

    /* the stored ratios come back as an object */
    json_t *v = cn_server_render (rec, true, 0, NULL, 0, T0, FRESH, NULL);
    json_t *r = json_object_get (v, "overprovision_ratios");
    CHECK_INT (json_integer_value (json_object_get (r, "cpu")), 4);
    CHECK (json_real_value (json_object_get (r, "ram")) == 1.5);
    json_decref (v);

    /* an empty update is fine */
    CHECK (s_update (rec, "{}", &e) == rec);
    /* params must be an object */
    memset (&e, 0, sizeof e);
    json_t *arr = json_array ();
    CHECK_INT (cn_server_update (rec, arr, T0, &e), -1);
    CHECK_INT (e.status, 409);
    json_decref (arr);

    json_decref (before);
    json_decref (rec);
}


/* VM state from the agent: hello's full state and single events, ordered by
 * each VM's seq (the same event from AMQP and the session lands once). */
static void
test_vms (void)
{
    const char *A = "11111111-1111-4111-8111-111111111111";
    const char *B = "22222222-2222-4222-8222-222222222222";
    json_t *rec = json_pack ("{s:s,s:i,s:f,s:{s:{s:s,s:i,s:i}}}", "uuid", "x", "ram", 1024,
                             "reservation_ratio", 0.0, "vms", A, "state", "running",
                             "seq", 5, "max_physical_memory", 100);
    /* hello: A older than stored (kept), B new */
    json_t *hello = json_pack ("{s:{s:s,s:i},s:{s:s,s:i,s:i}}", A, "state", "stopped", "seq", 4,
                               B, "state", "running", "seq", 1, "max_physical_memory", 24);
    CHECK_INT (cn_server_apply_vms (rec, hello, 1000), CN_SRV_WRITE);
    json_t *vms = json_object_get (rec, "vms");
    CHECK_STR (json_string_value (json_object_get (json_object_get (vms, A), "state")), "running");
    CHECK (json_object_get (vms, B) != NULL);
    CHECK_INT (json_integer_value (json_object_get (rec, "memory_provisionable_bytes")),
               (1024 - 124) * 1048576LL);
    CHECK_INT (cn_server_apply_vms (rec, hello, 1000), CN_SRV_UNCHANGED);
    json_decref (hello);

    /* events: newer applies, same or older is stale */
    json_t *vm = json_pack ("{s:s}", "state", "stopped");
    CHECK_INT (cn_server_apply_vm_event (rec, A, "state", 6, vm, 2000), CN_SRV_WRITE);
    CHECK_INT (cn_server_apply_vm_event (rec, A, "state", 6, vm, 2000), CN_SRV_STALE);
    CHECK_INT (cn_server_apply_vm_event (rec, A, "state", 3, vm, 2000), CN_SRV_STALE);
    /* the writer's check without applying: the same verdicts */
    CHECK (cn_server_vm_event_stale (rec, A, 6));
    CHECK (cn_server_vm_event_stale (rec, A, 3));
    CHECK (!cn_server_vm_event_stale (rec, A, 7));
    CHECK (!cn_server_vm_event_stale (rec, "00000000-0000-4000-8000-0000000000ff", 1));
    vms = json_object_get (rec, "vms");
    CHECK_INT (json_integer_value (json_object_get (json_object_get (vms, A), "seq")), 6);
    /* destroy, then a late older event does not bring it back */
    CHECK_INT (cn_server_apply_vm_event (rec, A, "destroy", 7, NULL, 3000), CN_SRV_WRITE);
    CHECK (json_object_get (json_object_get (rec, "vms"), A) == NULL);
    CHECK_INT (cn_server_apply_vm_event (rec, A, "update", 6, vm, 3000), CN_SRV_STALE);
    CHECK (cn_server_vm_event_stale (rec, A, 7));         /* the destroy's seq */
    CHECK (!cn_server_vm_event_stale (rec, A, 8));
    /* nor does a hello that still reported it at an older seq */
    json_t *h2 = json_pack ("{s:{s:s,s:i}}", A, "state", "running", "seq", 6);
    cn_server_apply_vms (rec, h2, 4000);
    CHECK (json_object_get (json_object_get (rec, "vms"), A) == NULL);
    CHECK (json_object_get (json_object_get (rec, "vms"), B) == NULL);   /* not reported: gone */
    json_decref (h2);
    /* a newer create brings it back and forgets the destroy */
    CHECK_INT (cn_server_apply_vm_event (rec, A, "create", 8, vm, 5000), CN_SRV_WRITE);
    CHECK (json_object_get (json_object_get (rec, "vms_destroyed"), A) == NULL);
    /* non-destroy without a VM object is not applied */
    CHECK_INT (cn_server_apply_vm_event (rec, B, "update", 9, NULL, 5000), CN_SRV_STALE);
    /* the API view hides the destroy memory */
    CHECK_INT (cn_server_apply_vm_event (rec, A, "destroy", 9, NULL, 6000), CN_SRV_WRITE);
    json_t *v = cn_server_render (rec, true, 0, NULL, 0, 6000, FRESH, NULL);
    CHECK (json_object_get (v, "vms_destroyed") == NULL);
    CHECK (json_object_get (v, "vms") != NULL);
    json_decref (v);
    json_decref (vm);
    json_decref (rec);
}

/* cn_params_parse_server: the parameters of a /servers/:uuid route, the
 * body checked before the uuid (as each route did it by hand) */
static json_t *
s_parse_server (const char *uuid, const char *body, char out[37], cn_apierr_t *e)
{
    cn_msgw_t w;
    cn_msgw_init (&w, "server_get", 1 + (body != NULL));
    cn_msgw_str (&w, "uuid", uuid);
    if (body)
        cn_msgw_str (&w, "body", body);
    char *data;
    size_t size;
    cn_msgw_take (&w, &data, &size);
    cn_msg_t m;
    char err[128];
    json_t *params = NULL;
    if (cn_msg_parse (&m, data, size, err, sizeof err) == 0) {
        params = cn_params_parse_server (&m, out, e);
        cn_msg_fini (&m);
    }
    free (data);
    return params;
}

static void
test_params_parse_server (void)
{
    char uuid[37] = "";
    cn_apierr_t e = { 0 };
    json_t *p = s_parse_server ("564D1B2A-8F2E-4C1D-9A3B-2F6E7D8C9B0A", "{\"ram\":64}", uuid, &e);
    CHECK (json_is_object (p));
    CHECK_INT (json_integer_value (json_object_get (p, "ram")), 64);
    CHECK_STR (uuid, "564d1b2a-8f2e-4c1d-9a3b-2f6e7d8c9b0a");
    json_decref (p);
    p = s_parse_server ("nope", "{}", uuid, &e);
    CHECK (p == NULL);
    CHECK_INT (e.status, 409);
    CHECK_STR (e.message, "Invalid server UUID: nope");
    cn_apierr_fini (&e);
    memset (&e, 0, sizeof e);
    p = s_parse_server ("nope", "[1]", uuid, &e);      /* the body first */
    CHECK (p == NULL);
    CHECK_INT (e.status, 400);
    cn_apierr_fini (&e);
}

int
main (void)
{
    RUN (test_index);
    RUN (test_apierr);
    RUN (test_parse_ok);
    RUN (test_parse_errors);
    RUN (test_sysinfo_load_verdicts);
    RUN (test_sysinfo_load_like);
    RUN (test_sysinfo_equal);
    RUN (test_apply_sysinfo_si);
    RUN (test_new_server);
    RUN (test_derivation_variants);
    RUN (test_operator_fields_kept);
    RUN (test_unchanged_and_freshness);
    RUN (test_stale);
    RUN (test_transitional_cleared_on_reboot);
    RUN (test_duplicate_uuid);
    RUN (test_status);
    RUN (test_list_query);
    RUN (test_render);
    RUN (test_update);
    RUN (test_vms);
    RUN (test_params_parse_server);
    return cn_test_done ();
}
