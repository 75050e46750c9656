/*
 * cn_agent_sysinfo: see include/cn_agent_sysinfo.h.
 */
#include "cn_agent_sysinfo.h"

#include "cn_util.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

/* ---- generated ---- */

void
cn_sysinfo_gen_uuid (const char *prefix, uint64_t index, char out[37])
{
    char tmp[64];
    snprintf (tmp, sizeof tmp, "%.8s-0000-4000-8000-%012llx", prefix ? prefix : "cafe0000",
              (unsigned long long) (index & 0xffffffffffffULL));
    memcpy (out, tmp, 36);
    out[36] = '\0';
}

typedef struct {
    char *buf;
    size_t n, cap;
} s_sb_t;

static void __attribute__ ((format (printf, 2, 3)))
s_add (s_sb_t *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start (ap, fmt);
        int w = vsnprintf (b->buf + b->n, b->cap - b->n, fmt, ap);
        va_end (ap);
        if (w < 0)
            abort ();
        if ((size_t) w < b->cap - b->n) {
            b->n += (size_t) w;
            return;
        }
        b->cap = (b->cap + (size_t) w + 1) * 2;
        b->buf = realloc (b->buf, b->cap);
        if (!b->buf)
            abort ();
    }
}

char *
cn_sysinfo_generate (const cn_sysinfo_gen_t *g, size_t *len)
{
    char uuid[37];
    const char *prefix = g->prefix ? g->prefix : "cafe0000";
    cn_sysinfo_gen_uuid (prefix, g->index, uuid);
    uint64_t i = g->index;
    unsigned long v = (unsigned long) (i + 1);
    s_sb_t b = { .cap = 4096 + g->size };
    b.buf = malloc (b.cap);
    if (!b.buf)
        abort ();
    long long boot = g->boot_time > 0 ? (long long) g->boot_time
                                      : 1709769600LL + (long long) (i % 86400);
    s_add (&b,
        "{\"Live Image\":\"20240307T000447Z\",\"System Type\":\"SunOS\","
        "\"Boot Time\":\"%lld\",\"Datacenter Name\":\"%s\",\"SDC Version\":\"7.0\","
        "\"Manufacturer\":\"Joyent\",\"Product\":\"Joyent-Compute-Platform-3302\","
        "\"Serial Number\":\"JPC%08llX\",\"SKU Number\":\"600-0042-01 Rev 1\","
        "\"HW Version\":\"S2600WF\",\"HW Family\":\"Joyent-Compute-Platform\","
        "\"Setup\":\"%s\",\"VM Capable\":true,\"Bhyve Capable\":true,"
        "\"Bhyve Max Vcpus\":96,\"HVM API\":true,"
        "\"CPU Type\":\"Intel(R) Xeon(R) Gold 6252 CPU @ 2.10GHz\","
        "\"CPU Virtualization\":\"vmx\",\"CPU Physical Cores\":2,"
        "\"UUID\":\"%s\",\"Hostname\":\"cn-%llu\",\"CPU Total Cores\":96,"
        "\"MiB of Memory\":\"392931\",\"Zpool\":\"zones\","
        "\"Zpool Disks\":\"c0t5000CCA0AB12C3D4d0,c0t5000CCA0AB12C3D5d0\","
        "\"Zpool Profile\":\"mirror\",\"Zpool Creation\":%lld,\"Zpool Size in GiB\":14208,"
        "\"Boot Parameters\":{\"rabbitmq\":\"guest:guest:rabbitmq.%s.example.com:5672\","
        "\"console\":\"ttyb\",\"ttyb-mode\":\"115200,8,n,1,-\",\"headnode\":\"false\","
        "\"boot_args\":\"\",\"bootargs\":\"\"},"
        "\"SDC Agents\":[{\"name\":\"cn-agent\",\"version\":\"2.13.1\"},"
        "{\"name\":\"vm-agent\",\"version\":\"1.10.0\"},"
        "{\"name\":\"net-agent\",\"version\":\"2.4.0\"},"
        "{\"name\":\"config-agent\",\"version\":\"1.11.0\"}],"
        "\"Network Interfaces\":{\"ixgbe0\":{\"MAC Address\":\"02:08:20:%02lx:%02lx:%02lx\","
        "\"ip4addr\":\"10.%lu.%lu.%lu\",\"Link Status\":\"up\",\"NIC Names\":[\"admin\"]},"
        "\"ixgbe1\":{\"MAC Address\":\"02:08:21:%02lx:%02lx:%02lx\",\"ip4addr\":\"\","
        "\"Link Status\":\"up\",\"NIC Names\":[\"external\"]}},"
        "\"Virtual Network Interfaces\":{},\"Link Aggregations\":{},"
        "\"Admin NIC Tag\":\"admin\",\"CN Agent Port\":%d",
        boot, g->datacenter ? g->datacenter : "dc1", (unsigned long long) i,
        g->setup ? "true" : "false", uuid, (unsigned long long) i,
        1546300800LL + (long long) (i % 100000), g->datacenter ? g->datacenter : "dc1",
        (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff,
        (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff,
        (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff,
        g->agent_port > 0 ? g->agent_port : 5309);
    if (g->admin_ip)
        s_add (&b, ",\"Admin IP\":\"%s\"", g->admin_ip);
    if (g->sequence > 0)
        s_add (&b, ",\"Burst Sequence\":%ld", g->sequence);
    s_add (&b, ",\"Disks\":{");
    /* Realistic padding: disks, until the next one would pass the size. */
    for (int d = 0;; d++) {
        char disk[160];
        int w = snprintf (disk, sizeof disk,
                          "%s\"c0t5000CCA0%08llX%04Xd0\":{\"Size in GB\":4000,"
                          "\"PID\":\"HUS726040ALS210\",\"VID\":\"HGST\",\"SSD\":false}",
                          d ? "," : "", (unsigned long long) (i & 0xffffffffULL), d);
        if (d >= 1 && b.n + (size_t) w + 2 > g->size)
            break;
        s_add (&b, "%s", disk);
    }
    while (g->size && b.n + 2 < g->size)
        s_add (&b, " ");
    s_add (&b, "}}");
    *len = b.n;
    return b.buf;
}

/* ---- parsers ---- */

int64_t
cn_sysinfo_meminfo_mib (const char *text)
{
    const char *p = text ? strstr (text, "MemTotal:") : NULL;
    if (!p)
        return -1;
    p += 9;
    while (*p == ' ' || *p == '\t')
        p++;
    char *end;
    long long kb = strtoll (p, &end, 10);
    if (end == p || kb < 0)
        return -1;
    return kb / 1024;
}

int
cn_sysinfo_cpuinfo (const char *text, char *model, size_t mlen)
{
    int n = 0;
    bool have_model = false;
    if (model && mlen)
        model[0] = '\0';
    for (const char *line = text; line && *line;) {
        const char *eol = strchr (line, '\n');
        size_t ll = eol ? (size_t) (eol - line) : strlen (line);
        if (ll >= 9 && strncmp (line, "processor", 9) == 0
            && (line[9] == ' ' || line[9] == '\t' || line[9] == ':'))
            n++;
        else if (!have_model && model && ll > 10 && strncmp (line, "model name", 10) == 0) {
            const char *c = memchr (line, ':', ll);
            if (c) {
                c++;
                while (*c == ' ' || *c == '\t')
                    c++;
                size_t vl = ll - (size_t) (c - line);
                if (vl >= mlen)
                    vl = mlen - 1;
                memcpy (model, c, vl);
                model[vl] = '\0';
                have_model = true;
            }
        }
        line = eol ? eol + 1 : NULL;
    }
    return n;
}

int64_t
cn_sysinfo_btime (const char *text)
{
    for (const char *line = text; line && *line;) {
        if (strncmp (line, "btime ", 6) == 0) {
            char *end;
            long long v = strtoll (line + 6, &end, 10);
            return end == line + 6 ? -1 : v;
        }
        const char *eol = strchr (line, '\n');
        line = eol ? eol + 1 : NULL;
    }
    return -1;
}

/* ---- this machine ---- */

static char *
s_read_file (const char *root, const char *path, size_t max)
{
    char full[4096];
    snprintf (full, sizeof full, "%s%s", root, path);
    FILE *f = fopen (full, "r");
    if (!f)
        return NULL;
    char *buf = malloc (max + 1);
    if (!buf)
        abort ();
    size_t n = fread (buf, 1, max, f);
    fclose (f);
    buf[n] = '\0';
    return buf;
}

static void
s_trim (char *s)
{
    size_t n = strlen (s);
    while (n && isspace ((unsigned char) s[n - 1]))
        s[--n] = '\0';
}

json_t *
cn_sysinfo_local (const cn_sysinfo_local_t *o, char *err, size_t errlen)
{
    const char *root = o->root ? o->root : "";
    char *mem = s_read_file (root, "/proc/meminfo", 65536);
    char *cpu = s_read_file (root, "/proc/cpuinfo", 4 * 1024 * 1024);
    char *stat = s_read_file (root, "/proc/stat", 1024 * 1024);
    if (!mem || !cpu || !stat) {
        snprintf (err, errlen, "cannot read %s/proc: %s", root, strerror (errno));
        free (mem);
        free (cpu);
        free (stat);
        return NULL;
    }
    int64_t mib = cn_sysinfo_meminfo_mib (mem);
    char model[256];
    int cores = cn_sysinfo_cpuinfo (cpu, model, sizeof model);
    int64_t btime = cn_sysinfo_btime (stat);
    free (mem);
    free (cpu);
    free (stat);

    char host[256] = "";
    if (gethostname (host, sizeof host) != 0 || !host[0])
        snprintf (host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    struct utsname un;
    memset (&un, 0, sizeof un);
    uname (&un);

    json_t *si = json_object ();
    char num[32];
    json_object_set_new (si, "UUID", json_string (o->uuid));
    json_object_set_new (si, "Hostname", json_string (host));
    json_object_set_new (si, "System Type", json_string (un.sysname[0] ? un.sysname : "Linux"));
    json_object_set_new (si, "Live Image", json_string (un.release));
    json_object_set_new (si, "Setup", json_string (o->setup ? "true" : "false"));
    if (o->datacenter)
        json_object_set_new (si, "Datacenter Name", json_string (o->datacenter));
    snprintf (num, sizeof num, "%lld", (long long) (mib > 0 ? mib : 0));
    json_object_set_new (si, "MiB of Memory", json_string (num));
    json_object_set_new (si, "CPU Total Cores", json_integer (cores));
    if (model[0])
        json_object_set_new (si, "CPU Type", json_string (model));
    if (btime > 0) {
        snprintf (num, sizeof num, "%lld", (long long) btime);
        json_object_set_new (si, "Boot Time", json_string (num));
    }
    json_object_set_new (si, "CN Agent Port", json_integer (o->agent_port > 0 ? o->agent_port : 5309));
    if (o->admin_ip)
        json_object_set_new (si, "Admin IP", json_string (o->admin_ip));
    json_object_set_new (si, "Admin NIC Tag", json_string ("admin"));
    json_object_set_new (si, "Boot Parameters", json_pack ("{s:s}", "headnode", "false"));

    /* NICs: /sys/class/net/<name>/{address,operstate}; IPv4 from getifaddrs. */
    json_t *nics = json_object ();
    struct ifaddrs *ifa = NULL;
    if (!o->root || !*o->root)
        getifaddrs (&ifa);
    char sysnet[4096];
    snprintf (sysnet, sizeof sysnet, "%s/sys/class/net", root);
    DIR *d = opendir (sysnet);
    bool admin_tagged = false;
    struct dirent *de;
    while (d && (de = readdir (d))) {
        if (de->d_name[0] == '.' || strcmp (de->d_name, "lo") == 0)
            continue;
        char path[4096];
        snprintf (path, sizeof path, "/sys/class/net/%s/address", de->d_name);
        char *mac = s_read_file (root, path, 64);
        if (!mac)
            continue;
        s_trim (mac);
        snprintf (path, sizeof path, "/sys/class/net/%s/operstate", de->d_name);
        char *oper = s_read_file (root, path, 64);
        if (oper)
            s_trim (oper);
        char ip[INET_ADDRSTRLEN] = "";
        for (struct ifaddrs *a = ifa; a; a = a->ifa_next) {
            if (a->ifa_addr && a->ifa_addr->sa_family == AF_INET
                && strcmp (a->ifa_name, de->d_name) == 0) {
                inet_ntop (AF_INET, &((struct sockaddr_in *) a->ifa_addr)->sin_addr,
                           ip, sizeof ip);
                break;
            }
        }
        json_t *nic = json_pack ("{s:s,s:s,s:s}", "MAC Address", mac, "ip4addr", ip,
                                 "Link Status", oper && strcmp (oper, "up") == 0 ? "up" : "down");
        json_t *names = json_array ();
        bool admin = o->admin_ip ? strcmp (ip, o->admin_ip) == 0 : (!admin_tagged && ip[0]);
        if (admin && !admin_tagged) {
            json_array_append_new (names, json_string ("admin"));
            admin_tagged = true;
        }
        json_object_set_new (nic, "NIC Names", names);
        json_object_set_new (nics, de->d_name, nic);
        free (mac);
        free (oper);
    }
    if (d)
        closedir (d);
    if (ifa)
        freeifaddrs (ifa);
    json_object_set_new (si, "Network Interfaces", nics);
    json_object_set_new (si, "Virtual Network Interfaces", json_object ());
    return si;
}

json_t *
cn_sysinfo_load_file (const char *path, const char *uuid, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *si = json_load_file (path, JSON_REJECT_DUPLICATES, &jerr);
    if (!si) {
        snprintf (err, errlen, "%s:%d: %s", path, jerr.line, jerr.text);
        return NULL;
    }
    if (!json_is_object (si)) {
        snprintf (err, errlen, "%s: sysinfo must be a JSON object", path);
        json_decref (si);
        return NULL;
    }
    json_t *u = json_object_get (si, "UUID");
    if (!u && uuid)
        json_object_set_new (si, "UUID", json_string (uuid));
    else if (!json_is_string (u) || !cn_uuid_valid (json_string_value (u))) {
        snprintf (err, errlen, "%s: \"UUID\" is not a UUID", path);
        json_decref (si);
        return NULL;
    }
    else if (uuid && strcasecmp (json_string_value (u), uuid) != 0) {
        snprintf (err, errlen, "%s: \"UUID\" %s is not the server_uuid %s", path,
                  json_string_value (u), uuid);
        json_decref (si);
        return NULL;
    }
    return si;
}

bool
cn_sysinfo_is_setup (const json_t *si)
{
    json_t *s = json_object_get (si, "Setup");
    return json_is_true (s) || (json_is_string (s) && strcmp (json_string_value (s), "true") == 0);
}
